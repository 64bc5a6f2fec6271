"""HomeNet for Python programs: open routes, ask nodes, remote-listen.

```python
from homenet import client

reader, writer = await client.open_connection("hn://relay.example.net/home1/192.168.1.20:22", key="alice:SECRET")
with client.connect("hn://relay.example.net/home1/192.168.1.20:22", key="alice:SECRET") as conn:
    conn.sendall(b"..."); conn.recv(4096)
async with client.Client("relay.example.net:6969", key="admin:SECRET") as relay:
    print((await relay.status()).active_sessions)
services = await client.query("hn://relay.example.net/home1", type_="ssh", key="alice:SECRET")
async with client.remote_listen("hn://relay.example.net", to="127.0.0.1:8080", key="home1:SECRET") as url:
    ...  # url is hn://relay.example.net:6969/home1-Xk3...
```

Every error HomeNet reports on purpose is an :data:`Error` (``homenet.node.errors.HomeNetError``):
``str(exc)`` is the one line the CLI prints, ``exc.code`` the numeric :class:`Code` (403, 404,
432, ...). :class:`RouteFailed` is a route that could not be opened (``.hop``: which hop
refused), :class:`ControlError` a control call that failed, :class:`Refused` a refused
registration. Usage errors (a bad URL, key or argument) are :class:`UsageError`, code 400.

The control-plane parts (:class:`Client`, :func:`query`, :func:`remote_listen`,
:class:`ControlError`, :class:`Refused`) load gRPC on first use, so a program (or
``homenet connect``) that only opens routes does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from homenet.client.options import FIRST_WAIT, MAX_WAIT, Key, credentials
from homenet.client.routes import Connection, Dialer, connect, open_connection, retryable
from homenet.node.auth import Credentials
from homenet.node.client import RouteFailed
from homenet.node.errors import Code, HomeNetError, UsageError
from homenet.node.tls import TLSError

#: The base of every error HomeNet reports on purpose (``.code``: a :class:`Code`).
Error = HomeNetError

_LAZY = {
    "Client": "homenet.client.control",
    "query": "homenet.client.control",
    "remote_listen": "homenet.client.listen",
    "ListenTimeout": "homenet.client.listen",
    "ControlError": "homenet.control.client",
    "Refused": "homenet.control.rl",
}

__all__ = [
    "FIRST_WAIT",
    "MAX_WAIT",
    "Client",
    "Code",
    "Connection",
    "ControlError",
    "Credentials",
    "Dialer",
    "Error",
    "Key",
    "ListenTimeout",
    "Refused",
    "RouteFailed",
    "TLSError",
    "UsageError",
    "connect",
    "credentials",
    "open_connection",
    "query",
    "remote_listen",
    "retryable",
]


if TYPE_CHECKING:  # mypy sees real imports (an unknown name stays an error); run time loads them on use
    from homenet.client.control import Client, query
    from homenet.client.listen import ListenTimeout, remote_listen
    from homenet.control.client import ControlError
    from homenet.control.rl import Refused
else:

    def __getattr__(name: str) -> Any:
        """The control-plane names, imported on first use (they need gRPC)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
