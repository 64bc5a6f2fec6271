"""HomeNet data-plane protocol v1, without I/O.

A data-plane connection opens with one request line per hop::

    HN/1 CONNECT <hop>[ <key>=<value>]...\\n        (a trailing \\r before \\n is accepted)

and the node answers each request with one reply line::

    HN/1 <code> <name>[ <reason>]\\n

After a ``200 ok`` reply, raw bytes flow both ways. Every byte the client sent after the
request line (the next hop's request, its payload) is handed back by the parser untouched,
so a client may pipeline the requests of a whole chain and its first payload in one write.

The parsers here take bytes and return events; ``b""`` means EOF. They cap what they buffer
and raise :class:`ProtocolError` (the peer misbehaved), never anything else, on bad input.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from homenet.node.errors import Code, HomeNetError

VERSION = 1
MAGIC = b"HN/"
#: Largest request or reply line, terminator included.
MAX_LINE = 1024
#: Extension fields allowed on one request line.
MAX_FIELDS = 16

GRPC_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


_SLUGS = {c.slug: c for c in Code}


class ProtocolError(HomeNetError):
    """The peer sent bytes that break the protocol; carries the reply code to send back."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason, code)


class Verb(enum.Enum):
    """What a request asks of the node."""

    CONNECT = "CONNECT"  # splice me to <hop>
    TICKET = "TICKET"  # a listener dialing back with a one-time ticket
    POOL = "POOL"  # a listener parking a warm idle connection


class Plane(enum.Enum):
    """What the first bytes of a connection say it is."""

    DATA = "data"
    GRPC = "grpc"
    #: HTTP/1.x: the gateway to a home's web servers, and the WebSocket tunnel.
    HTTP = "http"
    UNKNOWN = "unknown"


#: Request-line starts of HTTP/1.x (``PRI `` is HTTP/2's preface: gRPC, tested first).
HTTP_METHODS = tuple(
    m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
)
_MAGICS = ((MAGIC, Plane.DATA), (GRPC_PREFACE, Plane.GRPC), *((m, Plane.HTTP) for m in HTTP_METHODS))
_DATA = Plane.DATA


def detect_plane(prefix: bytes) -> Plane | None:
    """Classify a connection by its first bytes; ``None`` means more bytes are needed."""
    if prefix.startswith(MAGIC):  # the data plane, nearly every connection: one C call
        return _DATA
    if not prefix:
        return None
    for magic, plane in _MAGICS:
        n = min(len(prefix), len(magic))
        if prefix[:n] == magic[:n]:
            return plane if len(prefix) >= len(magic) else None
    return Plane.UNKNOWN


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request line."""

    verb: Verb
    arg: str
    fields: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """Serialise to one wire line (inverse of parsing)."""
        return encode_request(self.verb, self.arg, self.fields)


@dataclass(frozen=True, slots=True)
class Reply:
    """One parsed reply line: an error's free-text reason, or an OK reply's ``key=value``
    fields (``hop=2`` on a listener's activation line)."""

    code: Code
    reason: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code is Code.OK

    def encode(self) -> bytes:
        return encode_reply(self.code, self.reason, self.fields)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

# Tokens are printable ASCII without spaces; values of fields likewise.
_TOKEN = re.compile(rb"[\x21-\x7e]{1,512}")
_FIELD_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_VERSION = re.compile(rb"HN/(0|[1-9][0-9]{0,2})")
_CODE = re.compile(rb"[1-5][0-9]{2}")
_VERBS = {v.value.encode("ascii"): v for v in Verb}
#: A well-formed request line of this version without fields (what a plain CONNECT sends):
#: parsed with one match; anything else takes the checking path and its exact error.
_PLAIN_REQUEST = re.compile(rb"HN/1 (CONNECT|TICKET|POOL) ([\x21-\x7e]{1,512})")


def encode_request(verb: Verb, arg: str, fields: dict[str, str] | None = None) -> bytes:
    """Build one request line; raises ValueError on values the parser would refuse."""
    parts = [f"HN/{VERSION}", verb.value, arg]
    if len(fields or {}) > MAX_FIELDS:
        raise ValueError(f"more than {MAX_FIELDS} fields")
    for key, value in (fields or {}).items():
        if not _FIELD_KEY.fullmatch(key):
            raise ValueError(f"bad field name {key!r}")
        parts.append(f"{key}={value}")
    line = " ".join(parts).encode("ascii") + b"\n"
    if len(line) > MAX_LINE or any(not _TOKEN.fullmatch(p.encode("ascii")) for p in parts):
        raise ValueError("request does not fit protocol limits")
    return line


def encode_reply(code: Code, reason: str = "", fields: dict[str, str] | None = None) -> bytes:
    """Build one reply line; the reason is made printable and cut to fit. ``fields`` (OK
    replies) go where an error's reason would."""
    if fields:
        reason = " ".join([*(f"{k}={v}" for k, v in fields.items()), reason]).rstrip()
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in reason)
    head = f"HN/{VERSION} {int(code)} {code.slug}"
    line = f"{head} {clean}" if clean else head
    return line.encode("ascii")[: MAX_LINE - 1] + b"\n"


class _LineReader:
    """Buffers bytes until one newline-terminated line of at most MAX_LINE bytes."""

    __slots__ = ("_buf", "_eof", "_max", "_what")

    def __init__(self, what: str, max_line: int) -> None:
        # bytes, not a bytearray: a preamble nearly always comes in one read, which is then
        # kept as it is (no copy in, no copy out)
        self._buf = b""
        self._what = what
        self._max = max_line
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes as they came; ``b""`` means EOF."""
        if self._eof and data:
            raise RuntimeError("data after EOF")  # local bug: the caller fed past EOF
        if not data:
            self._eof = True
        self._buf = self._buf + bytes(data) if self._buf else bytes(data)

    def take_line(self) -> bytes | None:
        buf = self._buf
        nl = buf.find(b"\n", 0, self._max)
        if nl < 0:
            if len(buf) >= self._max:
                raise ProtocolError(Code.TOO_LARGE, f"{self._what} longer than {self._max} bytes")
            if self._eof:
                what = "connection closed" if not buf else f"truncated {self._what}"
                raise ProtocolError(Code.BAD_REQUEST, what)
            return None
        line = buf[:nl]
        self._buf = buf[nl + 1 :]
        return line[:-1] if line.endswith(b"\r") else line

    def trailing(self) -> bytes:
        """Bytes received after the last line taken (taken once)."""
        out, self._buf = self._buf, b""
        return out


def _split_version(line: bytes, what: str) -> list[bytes]:
    if b"\x00" in line:
        raise ProtocolError(Code.BAD_REQUEST, f"NUL byte in {what}")
    parts = line.split(b" ")
    m = _VERSION.fullmatch(parts[0])
    if m is None:
        raise ProtocolError(Code.BAD_REQUEST, f"{what} does not start with HN/<version>")
    if int(m.group(1)) != VERSION:
        raise ProtocolError(
            Code.VERSION_NOT_SUPPORTED, f"protocol version {int(m.group(1))} not supported (speak HN/{VERSION})"
        )
    if any(not _TOKEN.fullmatch(p) for p in parts):
        raise ProtocolError(Code.BAD_REQUEST, f"{what} has empty or non-printable fields")
    return parts


class RequestParser(_LineReader):
    """Parses the requests a client sends, one per hop; sans-IO.

    Feed bytes with :meth:`receive_data`, then call :meth:`next_event` until it returns
    ``NEED_DATA``. After a :class:`Request`, :meth:`trailing` returns the bytes that followed it
    (they belong to the next hop). One object per connection, so the line buffer is its base
    class rather than a second object.
    """

    __slots__ = ()

    def __init__(self, max_line: int = MAX_LINE) -> None:
        super().__init__("request line", max_line)

    def next_event(self) -> Request | _NeedData:
        line = self.take_line()
        if line is None:
            return NEED_DATA
        return parse_request_line(line)


#: The request field a node stamps on the next hop's request: hops the route already took.
DEPTH_FIELD = "depth"


def stamp_depth(data: bytes, depth: int) -> bytes | None:
    """``data`` (bytes a client pipelined after its request) with its first request line
    stamped ``depth=DEPTH``, so the next node counts this hop even when it was a direct
    ``ip:port`` one (two nodes that allow each other cannot bounce a route forever). None:
    the line is not complete yet. Bytes that are not a request line come back unchanged."""
    if not data.startswith(MAGIC):
        return data
    end = data.find(b"\n")
    if end < 0:
        return None if len(data) < MAX_LINE else data  # the next node refuses an overlong line
    try:
        req = parse_request_line(data[:end].rstrip(b"\r"))
    except ProtocolError:
        return data  # the next node refuses it, with its own reason
    try:
        return encode_request(req.verb, req.arg, {**req.fields, DEPTH_FIELD: str(depth)}) + data[end + 1 :]
    except ValueError:  # no room for the stamp: refuse rather than let the hop go uncounted
        raise ProtocolError(Code.BAD_REQUEST, "the next request line has no room for its hop count") from None


def request_depth(req: Request) -> int:
    """The hop count a request carries (0 when none: a client's first hop)."""
    text = req.fields.get(DEPTH_FIELD, "0")
    return int(text) if text.isdigit() and len(text) <= 3 else 0


def parse_request_line(line: bytes) -> Request:
    """Parse one request line (without its terminator)."""
    m = _PLAIN_REQUEST.fullmatch(line)
    if m is not None:
        return Request(_VERBS[m.group(1)], m.group(2).decode("ascii"), {})
    parts = _split_version(line, "request")
    if len(parts) < 3:
        raise ProtocolError(Code.BAD_REQUEST, "request needs HN/1 VERB ARGUMENT")
    verb = _VERBS.get(parts[1])
    if verb is None:
        raise ProtocolError(Code.BAD_REQUEST, f"unknown verb {parts[1][:32].decode('ascii')!r}")
    extra = parts[3:]
    if len(extra) > MAX_FIELDS:
        raise ProtocolError(Code.BAD_REQUEST, f"more than {MAX_FIELDS} fields")
    fields: dict[str, str] = {}
    for item in extra:
        key, sep, value = item.decode("ascii").partition("=")
        if not sep or not _FIELD_KEY.fullmatch(key) or key in fields:
            raise ProtocolError(Code.BAD_REQUEST, f"bad field {item[:40].decode('ascii')!r}")
        fields[key] = value
    return Request(verb, parts[2].decode("ascii"), fields)


class ReplyParser(_LineReader):
    """Parses the replies a node sends, one per request; sans-IO (client side). After the
    last reply, :meth:`trailing` returns the target's first bytes."""

    __slots__ = ()

    def __init__(self, max_line: int = MAX_LINE) -> None:
        super().__init__("reply line", max_line)

    def next_event(self) -> Reply | _NeedData:
        line = self.take_line()
        if line is None:
            return NEED_DATA
        return parse_reply_line(line)


def parse_reply_line(line: bytes) -> Reply:
    """Parse one reply line (without its terminator)."""
    parts = line.split(b" ", 3)  # HN/1, code, name, free-text reason
    if len(parts) < 3:
        raise ProtocolError(Code.BAD_REQUEST, "reply needs HN/1 CODE NAME")
    _split_version(b" ".join(parts[:3]), "reply")
    if not _CODE.fullmatch(parts[1]):
        raise ProtocolError(Code.BAD_REQUEST, "reply code is not a 3-digit number")
    try:
        code = Code(int(parts[1]))
    except ValueError:
        raise ProtocolError(Code.BAD_REQUEST, f"unknown reply code {parts[1][:8].decode('ascii')}") from None
    if _SLUGS.get(parts[2].decode("ascii")) is not code:
        raise ProtocolError(Code.BAD_REQUEST, f"reply code {int(code)} with wrong name")
    reason = parts[3] if len(parts) == 4 else b""
    if not all(0x20 <= b <= 0x7E for b in reason):
        raise ProtocolError(Code.BAD_REQUEST, "non-printable reply reason")
    text = reason.decode("ascii")
    if code is Code.OK and text:
        pairs = [item.partition("=") for item in text.split(" ")]
        if all(sep and _FIELD_KEY.fullmatch(k) and v for k, sep, v in pairs) and len(pairs) <= MAX_FIELDS:
            return Reply(code, "", {k: v for k, _, v in pairs})
    return Reply(code, text)
