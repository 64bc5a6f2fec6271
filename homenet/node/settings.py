"""One typed settings object for a node, built once from file, environment and flags.

Precedence: command-line flags > ``HOMENET_*`` environment variables > TOML config file >
defaults. Every value is validated on construction; a bad one raises :class:`SettingsError`
with a one-line message naming where it came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from homenet.node.address import DEFAULT_PORT, AddressError, parse_endpoint, parse_url
from homenet.node.errors import UsageError


class SettingsError(UsageError, ValueError):
    """A setting with a bad value; the message names the setting and its source."""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "homenet")


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to run; immutable once built."""

    bind: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    name: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "homenet")
    rl: tuple[str, ...] = ()
    listen_id: str | None = None
    allow: tuple[str, ...] = ()
    mdns: bool = True
    #: Addresses of the interfaces to run mDNS on (empty: all).
    mdns_interface: tuple[str, ...] = ()
    #: Service types to browse (empty: HomeNet's default list).
    mdns_types: tuple[str, ...] = ()
    state_dir: str = field(default_factory=_default_state_dir)
    log_level: str = "info"
    log_format: str = "text"
    #: Seconds a client has to send its preamble (and a gRPC client its preface).
    handshake_timeout: float = 5.0
    #: Seconds to resolve and connect to a target.
    dial_timeout: float = 10.0
    #: Seconds without a byte either way before a session is closed (0: never).
    idle_timeout: float = 3600.0
    #: Seconds SIGTERM waits for sessions to finish before closing them.
    drain_grace: float = 10.0
    #: Spliced sessions at once; more get ``429 too-many``.
    max_sessions: int = 20000
    #: Connections still in their handshake at once; more are closed at accept.
    max_handshakes: int = 256
    #: Warm connections to keep parked at each relay we remote-listen on (0: dial back only).
    pool_size: int = 4
    #: Cap in seconds of the reconnect backoff to a relay (exponential with jitter below it).
    rl_backoff_max: float = 1.5
    #: Relay role: seconds between pings on listener streams (3 missed = dead).
    ping_interval: float = 2.0
    #: Relay role: seconds an offline listenId stays reserved for its owner.
    offline_hold: float = 60.0
    #: Keys file (TOML) of the keys this node accepts; default: <state_dir>/keys.toml.
    keys_file: str | None = None
    #: This node's own key (``ID:SECRET``) for the relays and nodes it talks to.
    key: str | None = field(default=None, repr=False)
    #: Remote listen: ``required`` (a listen key claims its own id) or ``open`` (anonymous
    #: nodes get random ids, or claim ids no key reserves).
    rl_auth: str = "required"
    #: ``none``, ``direct`` (direct targets and non-public services need a connect key) or ``all``.
    connect_auth: str = "direct"
    #: Discovery queries: ``required`` (a query key) or ``open``.
    query_auth: str = "required"
    #: Connections in handshake from one source (IPv4 address or IPv6 /64) at once.
    max_per_source: int = 64
    #: Sessions one listener may have at once.
    max_listener_sessions: int = 1000
    #: Failed authentications from one source (within a minute) before it is blocked.
    penalty_threshold: int = 5
    #: Seconds a source is first blocked for (doubles on repeat, up to 10 minutes).
    penalty_seconds: float = 30.0
    #: TLS on the one port (both planes): certificate chain and key files (PEM).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Require client certificates signed by this CA (mTLS for relay peers and operators).
    tls_client_ca: str | None = None
    #: CA bundle to verify hns:// relays with (default: the system store).
    tls_ca: str | None = None
    #: Relay role: ``host:port`` listeners dial back to (this process's own address when a
    #: load balancer spreads the public one over many relays); empty: the public address.
    advertise: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} out of range 0-65535")
        try:
            parse_endpoint(f"[{self.bind}]:1" if ":" in self.bind else f"{self.bind}:1")
        except AddressError:
            raise SettingsError(f"bind {self.bind!r} is not an IP address or hostname") from None
        for url in self.rl:
            try:
                parse_url(url)
            except AddressError as exc:
                raise SettingsError(f"rl: {exc}") from None
        for iface in self.mdns_interface:
            if iface != "all":
                try:
                    ipaddress.ip_address(iface)
                except ValueError:
                    raise SettingsError(f"mdns_interface {iface!r}: expected an IP address of this host") from None
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level {self.log_level!r}: expected debug, info, warning or error")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format {self.log_format!r}: expected text or json")
        if self.listen_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.listen_id):
            raise SettingsError(f"listen_id {self.listen_id!r}: expected 1-64 of A-Z a-z 0-9 _ -")
        for name, allowed in (
            ("rl_auth", ("required", "open")),
            ("connect_auth", ("none", "direct", "all")),
            ("query_auth", ("required", "open")),
        ):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} {getattr(self, name)!r}: expected {' or '.join(allowed)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key go together: give both or neither")
        if self.key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{22,128}", self.key):
            raise SettingsError("key must be ID:SECRET (the line `homenet key new` printed)")
        for name in ("max_sessions", "max_handshakes", "max_per_source", "max_listener_sessions", "penalty_threshold"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1")
        if not 0 <= self.pool_size <= 64:
            raise SettingsError("pool_size must be 0-64")
        for name in (
            "handshake_timeout", "dial_timeout", "drain_grace", "rl_backoff_max", "ping_interval", "offline_hold",
            "penalty_seconds",
        ):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{name} must be > 0, got {value}")
        if self.advertise:
            try:
                parse_endpoint(self.advertise)
            except AddressError as exc:
                raise SettingsError(f"advertise {self.advertise!r}: {exc}") from None
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise SettingsError(f"idle_timeout must be >= 0 (0 disables it), got {self.idle_timeout}")

    @property
    def keys_path(self) -> Path:
        return Path(self.keys_file) if self.keys_file else Path(self.state_dir) / "keys.toml"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _to_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _to_list(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.replace(",", " ").split() if p)


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    kind = str(f.type)
    if kind == "bool":
        return _to_bool
    if kind == "int":
        return int
    if kind == "float":
        return float
    if kind.startswith("tuple"):
        return _to_list
    return str


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    """Turn a file or env value into the field's type, naming the source on failure."""
    kind = str(f.type)
    try:
        if isinstance(value, str):
            return _converter(f)(value)
        if kind.startswith("tuple") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    raise SettingsError(f"{source}: wrong type {type(value).__name__} for {f.name}")


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
) -> Settings:
    """Build settings from a TOML file, ``HOMENET_*`` variables and flags (highest wins).

    ``flags`` holds only the options the user gave (``None`` values are ignored).
    The config file is ``config``, else ``HOMENET_CONFIG``, else none.
    """
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config or env.get("HOMENET_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config {path} is not valid TOML: {exc}") from None
        if "node" in table:
            if not isinstance(table["node"], dict):
                raise SettingsError(f"config {path}: 'node' must be a table ([node])")
            if len(table) > 1:
                raise SettingsError(f"config {path}: put every setting under [node], or none")
            table = table["node"]
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise SettingsError(f"config {path}: unknown setting {key!r}")
            values[name] = _coerce(by_name[name], value, f"config {path}: {key}")
            sources[name] = f"config {path}"
    for name, f in by_name.items():
        var = f"HOMENET_{name.upper()}"
        if var in env and not (env[var] == "" and f.default is None):  # VAR= means unset, as in a shell
            values[name] = _coerce(f, env[var], var)
            sources[name] = var
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = "--" + name.replace("_", "-")
    try:
        return Settings(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from None
    except SettingsError as exc:  # name where the bad value came from
        name = str(exc).split(" ", 1)[0].rstrip(":")
        raise SettingsError(f"{sources[name]}: {exc}" if name in sources else str(exc)) from None
