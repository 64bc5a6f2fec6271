"""What the admin address serves: ``/metrics``, the dashboard's files and its JSON state.

The dashboard is static HTML, CSS and one small script (``homenet/control/dashboard/``, no
build step) that polls ``/api/state``: the same status, listeners, sessions and fleet peers
``hnctl`` shows, as JSON (protobuf field names, the gRPC API's own shape).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources

from google.protobuf.json_format import MessageToDict

from homenet.control.admin import Handler, Page
from homenet.control.fleet import FleetServicer
from homenet.control.metrics import CONTENT_TYPE
from homenet.control.relay import to_listener_message
from homenet.control.server import NodeServicer
from homenet.node.relay import Relay

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def _dict(msg: object) -> dict[str, object]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)  # type: ignore[arg-type]


def state(node: NodeServicer, relay: Relay, fleet: FleetServicer) -> dict[str, object]:
    """The node as the dashboard shows it."""
    peers = fleet.peers()
    return {
        "status": _dict(node.own_status()),
        "listeners": [_dict(to_listener_message(lst)) for lst in relay.registry.all()],
        "sessions": [_dict(s) for s in node.own_sessions()],
        "fleet": {"self": _dict(peers.self), "peers": [_dict(p) for p in peers.peers], "moving": peers.moving},
    }


def pages(
    metrics: Callable[[], Awaitable[bytes]], node: NodeServicer, relay: Relay, fleet: FleetServicer
) -> dict[str, Handler]:
    """Path -> handler for the admin server."""

    async def metrics_page() -> Page:
        return Page(await metrics(), CONTENT_TYPE)

    async def state_page() -> Page:
        body = json.dumps(state(node, relay, fleet), separators=(",", ":")).encode()
        return Page(body, "application/json")

    out: dict[str, Handler] = {"/metrics": metrics_page, "/api/state": state_page}
    files = resources.files("homenet.control") / "dashboard"
    for path, (name, ctype) in _STATIC.items():
        body = (files / name).read_bytes()

        async def static(body: bytes = body, ctype: str = ctype) -> Page:
            return Page(body, ctype)

        out[path] = static
    return out
