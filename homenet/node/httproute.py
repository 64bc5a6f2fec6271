"""The HTTP gateway's decisions, with no I/O: which route a request names, which key it
carries, what the target sees of it, and the page a refusal gets.

A request names its route, in this order:

1. an ``HN-Route: home1/192.168.1.20:80`` header (programs);
2. its host, ``<listenId>.<domain>`` for the node's ``--http-domain`` (browsers, wildcard DNS):
   the labels before the domain, last first (``photos.home1.relay.example.net`` is
   ``home1/photos``);
3. a path prefix ``/hn/<route>/...``: the hops up to the first ``host:port`` one, or the first
   hop alone when none has a port (``/hn/home1/10.0.0.5:80/index.html``); the prefix is cut
   before the request goes on, and the route is remembered in a cookie so the page's
   absolute links (``/style.css``) follow it;
4. that cookie.

Its key (the HomeNet connect key, which the gateway signs each hop's request with, as a
client would): ``Authorization: Bearer ID:SECRET`` or the ``hn-key`` cookie the login page sets.
Both are taken out of the request before it goes on: the target never sees a HomeNet secret.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import quote, unquote

from homenet.node.address import MAX_HOPS, AddressError, Hop, parse_hop
from homenet.node.errors import Code

ROUTE_HEADER = b"hn-route"
KEY_COOKIE = "hn-key"
ROUTE_COOKIE = "hn-route"
PATH_PREFIX = b"/hn/"
#: The gateway's own pages (never forwarded).
OWN_PREFIX = b"/.hn/"
LOGIN_PATH = b"/.hn/login"
LOGOUT_PATH = b"/.hn/logout"
_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{22,128}")
#: Hop-by-hop headers (RFC 9110 7.6.1) and ours: never passed on.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", ROUTE_HEADER}
)


class RouteRefused(Exception):
    """A request the gateway answers itself with ``code`` (a one-line ``reason``)."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Named:
    """A request's route, and the request target the next hop sees."""

    hops: tuple[Hop, ...]
    target: bytes
    #: How it was named: header, host, path or cookie.
    by: str

    @property
    def text(self) -> str:
        return "/".join(str(h) for h in self.hops)


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), or None."""
    return next((v for k, v in headers if k == name), None)


def cookies(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's cookies (the first of each name)."""
    out: dict[str, str] = {}
    for k, v in headers:
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, sep, value = part.strip().partition("=")
                if sep and name not in out:
                    out[name] = value
    return out


def parse_route(text: str) -> tuple[Hop, ...]:
    """``home1/192.168.1.20:80`` as hops; RouteRefused (400) if it is not a route."""
    parts = [p for p in text.strip().strip("/").split("/")]
    if not parts or any(not p for p in parts):
        raise RouteRefused(Code.BAD_REQUEST, f"bad route {text[:100]!r}: expected HOP[/HOP...]")
    if len(parts) > MAX_HOPS:
        raise RouteRefused(Code.BAD_REQUEST, f"bad route: more than {MAX_HOPS} hops")
    try:
        return tuple(parse_hop(p) for p in parts)
    except AddressError as exc:
        raise RouteRefused(Code.BAD_REQUEST, str(exc)) from None


def name_route(target: bytes, headers: list[tuple[bytes, bytes]], domain: str | None) -> Named:
    """The route ``target`` + ``headers`` name (see the module doc); RouteRefused if none."""
    given = header(headers, ROUTE_HEADER)
    if given is not None:
        return Named(parse_route(given.decode("latin-1")), target, "header")
    host = (header(headers, b"host") or b"").decode("latin-1").lower()
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if domain and host.endswith("." + domain):
        labels = host[: -len(domain) - 1].split(".")
        return Named(parse_route("/".join(reversed(labels))), target, "host")
    if target.startswith(PATH_PREFIX):
        return _by_path(target)
    remembered = cookies(headers).get(ROUTE_COOKIE)
    if remembered:
        return Named(parse_route(unquote(remembered)), target, "cookie")
    where = f"{{listenId}}.{domain}, " if domain else ""
    raise RouteRefused(
        Code.NOT_FOUND, f"this request names no route: send an HN-Route header, or use {where}/hn/ROUTE/..."
    )


def _by_path(target: bytes) -> Named:
    path, sep, query = target[len(PATH_PREFIX) :].partition(b"?")
    segments = path.decode("latin-1").split("/")
    end = next((i for i, s in enumerate(segments) if ":" in unquote(s)), 0)
    if end >= MAX_HOPS:
        raise RouteRefused(Code.BAD_REQUEST, f"bad route: more than {MAX_HOPS} hops")
    hops = parse_route("/".join(unquote(s) for s in segments[: end + 1]))
    rest = "/".join(segments[end + 1 :])
    return Named(hops, b"/" + rest.encode("latin-1") + sep + query, "path")


def key_of(headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """The HomeNet key (id, secret) a request carries, if any."""
    auth = header(headers, b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and _KEY.fullmatch(value.strip()):
            kid, _, secret = value.strip().partition(":")
            return kid, secret
    found = cookies(headers).get(KEY_COOKIE)
    if found and _KEY.fullmatch(found):
        kid, _, secret = found.partition(":")
        return kid, secret
    return None


def onward_headers(
    headers: list[tuple[bytes, bytes]], peer_ip: str, tls: bool, *, upgrade: bool
) -> list[tuple[bytes, bytes]]:
    """What the target sees: hop-by-hop headers, our own headers and cookies and the HomeNet
    key removed; ``X-Forwarded-For`` (appended), ``-Proto`` and ``-Host`` set."""
    named_in_connection = {
        t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",") if t.strip()
    }
    out: list[tuple[bytes, bytes]] = []
    forwarded_for = b""
    for k, v in headers:
        if k in _HOP_BY_HOP or k in named_in_connection or k == b"expect":
            continue
        if k == b"authorization" and _is_key(v):
            continue
        if k == b"cookie":
            kept = [p for p in v.split(b";") if p.strip().partition(b"=")[0] not in (b"hn-key", b"hn-route")]
            if kept:
                out.append((k, b";".join(kept).strip()))
            continue
        if k == b"x-forwarded-for":
            forwarded_for = v + b", "
            continue
        if k in (b"x-forwarded-proto", b"x-forwarded-host"):
            continue
        out.append((k, v))
    out.append((b"x-forwarded-for", forwarded_for + peer_ip.encode()))
    out.append((b"x-forwarded-proto", b"https" if tls else b"http"))
    out.append((b"x-forwarded-host", header(headers, b"host") or b""))
    if upgrade:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", header(headers, b"upgrade") or b""))
    return out


def _is_key(value: bytes) -> bool:
    scheme, _, rest = value.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and _KEY.fullmatch(rest.strip()) is not None


def backward_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What the client sees of the target's response headers (hop-by-hop ones removed)."""
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",") if t.strip()}
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP and k not in named]


def wants_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """The client asks to switch protocols (a WebSocket, typically)."""
    conn = header(headers, b"connection") or b""
    return header(headers, b"upgrade") is not None and b"upgrade" in conn.lower()


# -- refusals ------------------------------------------------------------------------------------

_HINTS = {
    Code.BAD_REQUEST: "Check the route: HOP[/HOP...], each a listenId or host:port.",
    Code.UNAUTHORIZED: "This route needs a HomeNet connect key: log in, or send Authorization: Bearer ID:SECRET.",
    Code.FORBIDDEN: "The key or the node's policy does not allow this target.",
    Code.NOT_FOUND: "No such listener or service: check the listenId (hnctl listeners, hnctl query).",
    Code.TOO_MANY: "The node is at a limit; retry in a moment.",
    Code.MOVING: "The home is moving to another relay of the fleet; retry in a moment.",
    Code.UNAVAILABLE: "The home is offline or the node is shutting down; retry later.",
    Code.BAD_GATEWAY: "The target did not answer properly: is the server at home running?",
    Code.GATEWAY_TIMEOUT: "The target took too long to answer.",
}


def http_status(code: Code) -> int:
    """The HTTP status a refusal is sent with (HomeNet's own 43x codes become 503 or 400)."""
    if code is Code.MOVING:
        return 503
    if code in (Code.HOP_LIMIT, Code.LOOP):
        return 508
    if code is Code.UNRESOLVABLE:
        return 502
    return int(code) if 400 <= int(code) <= 599 else 502


def refusal_page(code: Code, reason: str, *, as_html: bool, login: bool, after: str = "/") -> tuple[bytes, str]:
    """The body and content type a refusal is sent with: one HTML page, or one text line."""
    line = f"HomeNet {int(code)} {code.slug}: {reason}"
    hint = _HINTS.get(code, "")
    if not as_html:
        return (line + "\n").encode(), "text/plain; charset=utf-8"
    back = html.escape(quote(after, safe="/"))
    link = f'<p><a href="/.hn/login?next={back}">Log in with a HomeNet key</a></p>' if login else ""
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>HomeNet: {html.escape(code.slug)} ({int(code)})</title></head>"
        f"<body><h1>HomeNet: {html.escape(code.slug)} ({int(code)})</h1>"
        f"<p>{html.escape(reason)}</p><p>{html.escape(hint)}</p>{link}</body></html>\n"
    )
    return body.encode(), "text/html; charset=utf-8"


def wants_html(headers: list[tuple[bytes, bytes]]) -> bool:
    return b"text/html" in (header(headers, b"accept") or b"")


def raw_refusal(code: Code, reason: str, status: int | None = None) -> bytes:
    """A whole ``Connection: close`` response for a request the node refused before the
    gateway parsed it (a malformed head, a deadline): one text line."""
    body = f"HomeNet {int(code)} {code.slug}: {reason}\n".encode()
    status = status or http_status(code)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nhn-error: {int(code)} {code.slug}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
