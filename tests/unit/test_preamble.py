"""The sans-IO data-plane parser: bytes in, events out, no sockets."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homenet.node.errors import Code
from homenet.node.preamble import (
    GRPC_PREFACE,
    MAX_FIELDS,
    MAX_LINE,
    NEED_DATA,
    Plane,
    ProtocolError,
    Reply,
    ReplyParser,
    Request,
    RequestParser,
    Verb,
    detect_plane,
    encode_reply,
    encode_request,
    parse_reply_line,
    parse_request_line,
    request_depth,
    stamp_depth,
)

REQ1 = b"HN/1 CONNECT home1 ticket=abc-123 x_y=\r\n"
REQ2 = b"HN/1 CONNECT 192.168.1.20:22\n"
# The payload looks like more requests, holds NUL, CR, LF and every byte value: none of it
# may be parsed, lost or reordered once the requests are taken.
PAYLOAD = b"SSH-2.0-OpenSSH_9.6\r\nHN/1 CONNECT evil\n\x00\xff\n" + bytes(range(256)) + b"tail"
STREAM = REQ1 + REQ2 + PAYLOAD
EXPECTED = [
    Request(Verb.CONNECT, "home1", {"ticket": "abc-123", "x_y": ""}),
    Request(Verb.CONNECT, "192.168.1.20:22"),
]


def _chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets, empty pieces dropped (b"" would mean EOF)."""
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _feed_requests(chunks: Iterable[bytes], want: int) -> tuple[list[Request], bytes]:
    """Feed chunks, take ``want`` requests as soon as they are complete, then the trailing bytes."""
    parser = RequestParser()
    events: list[Request] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while len(events) < want:
            ev = parser.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, Request)
            events.append(ev)
    return events, parser.trailing()


def _node_style(chunks: Iterable[bytes]) -> tuple[Request, bytes]:
    """What a node does: one request, then ``trailing()`` and the rest of the socket go on as-is."""
    parser = RequestParser()
    request: Request | None = None
    forwarded = b""
    for chunk in chunks:
        if request is not None:
            forwarded += chunk  # the splice reads the socket from here on
            continue
        parser.receive_data(chunk)
        ev = parser.next_event()
        if isinstance(ev, Request):
            request = ev
            forwarded = parser.trailing()
    assert request is not None
    return request, forwarded


def _raises(data: bytes, *, eof: bool = False) -> ProtocolError:
    parser = RequestParser()
    parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    return info.value


# -- valid input at every split point ------------------------------------------------------


def test_whole_stream_in_one_chunk() -> None:
    events, rest = _feed_requests([STREAM], 2)
    assert events == EXPECTED
    assert rest == PAYLOAD


def test_every_single_split_point() -> None:
    for cut in range(1, len(STREAM)):
        events, rest = _feed_requests(_chunks(STREAM, [cut]), 2)
        assert (events, rest) == (EXPECTED, PAYLOAD), cut


def test_every_pair_of_split_points_in_the_requests() -> None:
    head = len(REQ1) + len(REQ2) + 4
    for i in range(1, head):
        for j in range(i + 1, head):
            events, rest = _feed_requests(_chunks(STREAM, [i, j]), 2)
            assert (events, rest) == (EXPECTED, PAYLOAD), (i, j)


def test_byte_by_byte() -> None:
    events, rest = _feed_requests([bytes([b]) for b in STREAM], 2)
    assert events == EXPECTED
    assert rest == PAYLOAD


def test_node_forwards_everything_after_its_request_at_every_split_point() -> None:
    for cut in range(1, len(STREAM)):
        request, forwarded = _node_style(_chunks(STREAM, [cut]))
        assert (request, forwarded) == (EXPECTED[0], REQ2 + PAYLOAD), cut


def test_node_style_byte_by_byte() -> None:
    request, forwarded = _node_style([bytes([b]) for b in STREAM])
    assert request == EXPECTED[0]
    assert forwarded == REQ2 + PAYLOAD


def test_need_data_until_the_newline() -> None:
    parser = RequestParser()
    for b in REQ2[:-1]:
        parser.receive_data(bytes([b]))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(b"\n")
    assert parser.next_event() == EXPECTED[1]
    assert parser.next_event() is NEED_DATA
    assert parser.trailing() == b""


def test_trailing_is_taken_once() -> None:
    parser = RequestParser()
    parser.receive_data(REQ2 + b"abc")
    assert parser.next_event() == EXPECTED[1]
    assert parser.trailing() == b"abc"
    assert parser.trailing() == b""


def test_request_then_eof_is_clean() -> None:
    parser = RequestParser()
    parser.receive_data(REQ2)
    parser.receive_data(b"")
    assert parser.next_event() == EXPECTED[1]
    assert parser.trailing() == b""


def test_data_after_eof_is_a_local_bug() -> None:
    parser = RequestParser()
    parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"x")


@pytest.mark.parametrize("verb", list(Verb))
def test_every_verb(verb: Verb) -> None:
    assert parse_request_line(f"HN/1 {verb.value} arg".encode()) == Request(verb, "arg")


def test_field_values_may_hold_equals_and_be_empty() -> None:
    req = parse_request_line(b"HN/1 TICKET t0k a=b=c empty=")
    assert req == Request(Verb.TICKET, "t0k", {"a": "b=c", "empty": ""})


def test_exactly_max_fields() -> None:
    extra = " ".join(f"f{i}=v" for i in range(MAX_FIELDS))
    req = parse_request_line(f"HN/1 CONNECT x {extra}".encode())
    assert len(req.fields) == MAX_FIELDS
    assert list(req.fields) == [f"f{i}" for i in range(MAX_FIELDS)]


# -- size limits --------------------------------------------------------------------------


def _line_of(total: int, end: bytes = b"\n") -> bytes:
    """A valid request line of exactly ``total`` bytes, terminator included."""
    head = b"HN/1 CONNECT x a=" + b"v" * 500 + b" b="  # each token stays under 512 bytes
    line = head + b"v" * (total - len(head) - len(end)) + end
    assert len(line) == total
    return line


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_line_of_exactly_max_line_is_accepted(end: bytes) -> None:
    line = _line_of(MAX_LINE, end)
    parser = RequestParser()
    parser.receive_data(line + b"after")
    ev = parser.next_event()
    assert isinstance(ev, Request)
    assert ev.arg == "x"
    assert parser.trailing() == b"after"


def test_line_of_max_line_plus_one_is_too_large() -> None:
    assert _raises(_line_of(MAX_LINE + 1)).code is Code.TOO_LARGE


def test_max_line_minus_one_without_newline_needs_data() -> None:
    parser = RequestParser()
    parser.receive_data(b"H" * (MAX_LINE - 1))
    assert parser.next_event() is NEED_DATA


@pytest.mark.parametrize("size", [MAX_LINE, MAX_LINE + 1, 10 * MAX_LINE])
def test_oversize_without_newline(size: int) -> None:
    err = _raises(b"HN/1 CONNECT " + b"a" * (size - 13))
    assert err.code is Code.TOO_LARGE
    assert str(MAX_LINE) in err.reason


def test_oversize_detected_byte_by_byte_exactly_at_the_limit() -> None:
    parser = RequestParser()
    for i in range(MAX_LINE - 1):
        parser.receive_data(b"a")
        assert parser.next_event() is NEED_DATA, i
    parser.receive_data(b"a")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is Code.TOO_LARGE


def test_custom_max_line() -> None:
    parser = RequestParser(max_line=16)
    parser.receive_data(b"HN/1 CONNECT abc")  # 16 bytes, no newline
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is Code.TOO_LARGE
    small = RequestParser(max_line=16)
    small.receive_data(b"HN/1 CONNECT ab\n")  # 16 bytes with the newline
    assert small.next_event() == Request(Verb.CONNECT, "ab")


def test_newline_beyond_the_limit_does_not_count() -> None:
    err = _raises(b"HN/1 CONNECT " + b"a" * MAX_LINE + b"\n")
    assert err.code is Code.TOO_LARGE


def test_token_longer_than_512_is_a_bad_request() -> None:
    assert parse_request_line(b"HN/1 CONNECT " + b"a" * 512).arg == "a" * 512
    assert _raises(b"HN/1 CONNECT " + b"a" * 513 + b"\n").code is Code.BAD_REQUEST


# -- malformed input, each with its code --------------------------------------------------

BAD_REQUESTS: list[tuple[str, bytes, Code]] = [
    ("empty line", b"\n", Code.BAD_REQUEST),
    ("empty line crlf", b"\r\n", Code.BAD_REQUEST),
    ("http", b"GET / HTTP/1.1\r\n", Code.BAD_REQUEST),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\n", Code.BAD_REQUEST),
    ("nul in arg", b"HN/1 CONNECT a\x00b\n", Code.BAD_REQUEST),
    ("nul first", b"\x00HN/1 CONNECT a\n", Code.BAD_REQUEST),
    ("nul with bad version", b"HN/2 CONNECT a\x00\n", Code.BAD_REQUEST),
    ("non-utf8", b"HN/1 CONNECT \xff\xfe\n", Code.BAD_REQUEST),
    ("utf8 non-ascii", "HN/1 CONNECT hôme\n".encode(), Code.BAD_REQUEST),
    ("non-ascii verb", b"HN/1 CONN\xc3\xa9CT a\n", Code.BAD_REQUEST),
    ("non-ascii field", b"HN/1 CONNECT a k=\x80\n", Code.BAD_REQUEST),
    ("version 2", b"HN/2 CONNECT a\n", Code.VERSION_NOT_SUPPORTED),
    ("version 0", b"HN/0 CONNECT a\n", Code.VERSION_NOT_SUPPORTED),
    ("version 999", b"HN/999 CONNECT a\n", Code.VERSION_NOT_SUPPORTED),
    ("version dotted", b"HN/1.1 CONNECT a\n", Code.BAD_REQUEST),
    ("version lower case", b"hn/1 CONNECT a\n", Code.BAD_REQUEST),
    ("version missing", b"HN/ CONNECT a\n", Code.BAD_REQUEST),
    ("no version", b"CONNECT a\n", Code.BAD_REQUEST),
    ("unknown verb", b"HN/1 GET a\n", Code.BAD_REQUEST),
    ("lower-case verb", b"HN/1 connect a\n", Code.BAD_REQUEST),
    ("no argument", b"HN/1 CONNECT\n", Code.BAD_REQUEST),
    ("version only", b"HN/1\n", Code.BAD_REQUEST),
    ("double space", b"HN/1  CONNECT a\n", Code.BAD_REQUEST),
    ("trailing space", b"HN/1 CONNECT a \n", Code.BAD_REQUEST),
    ("tab", b"HN/1\tCONNECT a\n", Code.BAD_REQUEST),
    ("stray cr", b"HN/1 CONNECT a\r\r\n", Code.BAD_REQUEST),
    ("cr inside", b"HN/1 CONNECT a\rb\n", Code.BAD_REQUEST),
    ("del char", b"HN/1 CONNECT a\x7f\n", Code.BAD_REQUEST),
    ("field without =", b"HN/1 CONNECT a ticket\n", Code.BAD_REQUEST),
    ("field empty key", b"HN/1 CONNECT a =v\n", Code.BAD_REQUEST),
    ("field upper-case key", b"HN/1 CONNECT a Ticket=v\n", Code.BAD_REQUEST),
    ("field key starts with digit", b"HN/1 CONNECT a 1k=v\n", Code.BAD_REQUEST),
    ("field key too long", b"HN/1 CONNECT a k" + b"x" * 32 + b"=v\n", Code.BAD_REQUEST),
    ("field key with dot", b"HN/1 CONNECT a k.x=v\n", Code.BAD_REQUEST),
    ("duplicate field", b"HN/1 CONNECT a k=1 k=2\n", Code.BAD_REQUEST),
    (
        "too many fields",
        b"HN/1 CONNECT a " + b" ".join(f"f{i}=v".encode() for i in range(MAX_FIELDS + 1)) + b"\n",
        Code.BAD_REQUEST,
    ),
]


@pytest.mark.parametrize(("data", "code"), [(d, c) for _, d, c in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS])
def test_bad_request_lines(data: bytes, code: Code) -> None:
    err = _raises(data)
    assert err.code is code
    assert err.reason
    assert "\n" not in err.reason


@pytest.mark.parametrize(("data", "code"), [(d, c) for _, d, c in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS])
def test_bad_request_lines_byte_by_byte(data: bytes, code: Code) -> None:
    parser = RequestParser()
    for b in data[:-1]:
        parser.receive_data(bytes([b]))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(data[-1:])
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is code


def test_error_after_a_good_request() -> None:
    parser = RequestParser()
    parser.receive_data(REQ2 + b"HN/2 CONNECT b\n")
    assert parser.next_event() == EXPECTED[1]
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is Code.VERSION_NOT_SUPPORTED


def test_eof_before_anything() -> None:
    err = _raises(b"", eof=True)
    assert err.code is Code.BAD_REQUEST
    assert err.reason == "connection closed"


def test_eof_mid_line_at_every_offset() -> None:
    for cut in range(1, len(REQ1)):
        err = _raises(REQ1[:cut], eof=True)
        assert err.code is Code.BAD_REQUEST, cut
        assert "truncated" in err.reason


def test_eof_mid_line_on_the_reply_side() -> None:
    parser = ReplyParser()
    parser.receive_data(b"HN/1 200")
    parser.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is Code.BAD_REQUEST


def test_protocol_error_carries_code_and_reason() -> None:
    err = ProtocolError(Code.LOOP, "loop")
    assert (err.code, err.reason, str(err)) == (Code.LOOP, "loop", "loop")


# -- encoding requests ----------------------------------------------------------------------


def test_encode_request_wire_form() -> None:
    line = encode_request(Verb.CONNECT, "home1", {"ticket": "abc"})
    assert line == b"HN/1 CONNECT home1 ticket=abc\n"
    assert Request(Verb.CONNECT, "home1", {"ticket": "abc"}).encode() == line


def test_encode_request_without_fields() -> None:
    assert encode_request(Verb.POOL, "id") == b"HN/1 POOL id\n"


@pytest.mark.parametrize(
    ("arg", "fields"),
    [
        ("", None),
        ("a b", None),
        ("a\nb", None),
        ("hôme", None),
        ("a" * 513, None),
        ("a", {"Key": "v"}),
        ("a", {"": "v"}),
        ("a", {"k": "a b"}),
        ("a", {"k": "\x00"}),
        ("a", {"k": "é"}),
        ("a", {f"f{i}": "v" * 500 for i in range(3)}),  # longer than MAX_LINE
    ],
)
def test_encode_request_refuses_what_the_parser_would(arg: str, fields: dict[str, str] | None) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the contract is "ValueError"
        encode_request(Verb.CONNECT, arg, fields)


def test_encode_request_of_exactly_max_line() -> None:
    fields = {"a": "v" * 500, "b": "v" * 500}
    base = len(encode_request(Verb.CONNECT, "x", fields))
    fields["c"] = "v" * (MAX_LINE - base - 3)
    line = encode_request(Verb.CONNECT, "x", fields)
    assert len(line) == MAX_LINE
    assert parse_request_line(line[:-1]).fields == fields
    fields["c"] += "v"
    with pytest.raises(ValueError, match="limits"):
        encode_request(Verb.CONNECT, "x", fields)


def test_encode_request_refuses_more_than_max_fields() -> None:
    fields = {f"f{i}": "v" for i in range(MAX_FIELDS)}
    assert parse_request_line(encode_request(Verb.CONNECT, "x", fields)[:-1]).fields == fields
    fields["one_more"] = "v"
    with pytest.raises(ValueError, match="fields"):
        encode_request(Verb.CONNECT, "x", fields)


_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
_ARG = st.text(alphabet=_PRINTABLE, min_size=1, max_size=64)
_KEY = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=31),
)
_VALUE = st.text(alphabet=_PRINTABLE, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    verb=st.sampled_from(list(Verb)),
    arg=_ARG,
    fields=st.dictionaries(_KEY, _VALUE, max_size=MAX_FIELDS),
)
def test_request_round_trip(verb: Verb, arg: str, fields: dict[str, str]) -> None:
    line = encode_request(verb, arg, fields)
    assert line.endswith(b"\n")
    assert len(line) <= MAX_LINE
    parser = RequestParser()
    parser.receive_data(line + b"\x00payload")
    assert parser.next_event() == Request(verb, arg, fields)
    assert parser.trailing() == b"\x00payload"


# -- replies ------------------------------------------------------------------------------


def test_code_slugs() -> None:
    assert Code.OK.slug == "ok"
    assert Code.GATEWAY_TIMEOUT.slug == "gateway-timeout"
    assert Code.VERSION_NOT_SUPPORTED.slug == "version-not-supported"
    assert len({c.slug for c in Code}) == len(Code)


def test_stable_code_numbers() -> None:
    assert {c.name: int(c) for c in Code} == {
        "OK": 200,
        "BAD_REQUEST": 400,
        "UNAUTHORIZED": 401,
        "FORBIDDEN": 403,
        "NOT_FOUND": 404,
        "TIMEOUT": 408,
        "CONFLICT": 409,
        "TOO_LARGE": 413,
        "LOCKED": 423,
        "TOO_MANY": 429,
        "HOP_LIMIT": 430,
        "LOOP": 431,
        "MOVING": 432,
        "INTERNAL": 500,
        "BAD_GATEWAY": 502,
        "UNAVAILABLE": 503,
        "GATEWAY_TIMEOUT": 504,
        "VERSION_NOT_SUPPORTED": 505,
        "UNRESOLVABLE": 506,
    }


def test_encode_reply_wire_form() -> None:
    assert encode_reply(Code.OK) == b"HN/1 200 ok\n"
    assert encode_reply(Code.FORBIDDEN, "10.0.0.1:22 is not allowed") == (
        b"HN/1 403 forbidden 10.0.0.1:22 is not allowed\n"
    )
    assert Reply(Code.NOT_FOUND, "x").encode() == b"HN/1 404 not-found x\n"


@pytest.mark.parametrize("code", list(Code))
@pytest.mark.parametrize("reason", ["", "why it failed: a=b [::1]:22 ~!"])
def test_every_code_round_trips(code: Code, reason: str) -> None:
    line = encode_reply(code, reason)
    assert parse_reply_line(line[:-1]) == Reply(code, reason)
    parser = ReplyParser()
    parser.receive_data(line)
    reply = parser.next_event()
    assert reply == Reply(code, reason)
    assert isinstance(reply, Reply)
    assert reply.ok is (code is Code.OK)


def test_reply_reason_is_sanitised() -> None:
    line = encode_reply(Code.BAD_GATEWAY, "a\nb\r\x00c\x7fdé\t")
    assert line == b"HN/1 502 bad-gateway a?b??c?d??\n"
    assert parse_reply_line(line[:-1]) == Reply(Code.BAD_GATEWAY, "a?b??c?d??")


def test_reply_reason_is_cut_to_fit() -> None:
    line = encode_reply(Code.NOT_FOUND, "x" * 5000)
    assert len(line) == MAX_LINE
    assert line.endswith(b"x\n")
    parser = ReplyParser()
    parser.receive_data(line)
    reply = parser.next_event()
    assert isinstance(reply, Reply)
    assert reply.code is Code.NOT_FOUND
    assert reply.reason == "x" * (MAX_LINE - len(b"HN/1 404 not-found \n"))


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(list(Code)), reason=st.text(max_size=200))
def test_any_reason_encodes_to_a_parsable_line(code: Code, reason: str) -> None:
    line = encode_reply(code, reason)
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    reply = parse_reply_line(line[:-1])
    assert reply.code is code
    assert len(reply.reason) == len(reason)


REPLY_STREAM = b"HN/1 200 ok\r\nHN/1 200 ok relayed\n" + PAYLOAD


def _feed_replies(chunks: Iterable[bytes], want: int) -> tuple[list[Reply], bytes]:
    parser = ReplyParser()
    replies: list[Reply] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while len(replies) < want:
            ev = parser.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, Reply)
            replies.append(ev)
    return replies, parser.trailing()


def test_pipelined_replies_at_every_split_point() -> None:
    want = [Reply(Code.OK), Reply(Code.OK, "relayed")]
    for cut in range(1, len(REPLY_STREAM)):
        assert _feed_replies(_chunks(REPLY_STREAM, [cut]), 2) == (want, PAYLOAD), cut
    assert _feed_replies([bytes([b]) for b in REPLY_STREAM], 2) == (want, PAYLOAD)


BAD_REPLIES: list[tuple[str, bytes, Code]] = [
    ("empty", b"", Code.BAD_REQUEST),
    ("no name", b"HN/1 200", Code.BAD_REQUEST),
    ("unknown code", b"HN/1 299 ok", Code.BAD_REQUEST),
    ("code not a number", b"HN/1 abc ok", Code.BAD_REQUEST),
    ("wrong name", b"HN/1 200 forbidden", Code.BAD_REQUEST),
    ("upper-case name", b"HN/1 200 OK", Code.BAD_REQUEST),
    ("version 2", b"HN/2 200 ok", Code.VERSION_NOT_SUPPORTED),
    ("no version", b"HTTP/1.1 200 OK", Code.BAD_REQUEST),
    ("nul in head", b"HN/1 200 o\x00k", Code.BAD_REQUEST),
    ("nul in reason", b"HN/1 403 forbidden a\x00b", Code.BAD_REQUEST),
    ("non-ascii reason", "HN/1 403 forbidden é".encode(), Code.BAD_REQUEST),
    ("non-utf8 reason", b"HN/1 403 forbidden \xff", Code.BAD_REQUEST),
    ("tab in reason", b"HN/1 403 forbidden a\tb", Code.BAD_REQUEST),
    ("non-ascii name", b"HN/1 200 \xc3\xb6k", Code.BAD_REQUEST),
    ("double space", b"HN/1  200 ok", Code.BAD_REQUEST),
]


@pytest.mark.parametrize(("line", "code"), [(d, c) for _, d, c in BAD_REPLIES], ids=[n for n, _, _ in BAD_REPLIES])
def test_bad_reply_lines(line: bytes, code: Code) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_reply_line(line)
    assert info.value.code is code
    parser = ReplyParser()
    parser.receive_data(line + b"\n")
    with pytest.raises(ProtocolError) as info2:
        parser.next_event()
    assert info2.value.code is code


def test_reply_oversize() -> None:
    parser = ReplyParser()
    parser.receive_data(b"HN/1 200 ok " + b"x" * MAX_LINE)
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code is Code.TOO_LARGE
    assert "reply" in info.value.reason


@pytest.mark.parametrize(
    "line",
    [b"HN/1 +200 ok", b"HN/1 0200 ok", b"HN/1 2_00 ok", b"HN/1 20 ok", b"HN/1 2000 ok", b"HN/01 200 ok"],
)
def test_non_canonical_numbers_are_refused(line: bytes) -> None:
    # int() reads all of these as 200 or 1; the wire has one spelling per number
    with pytest.raises(ProtocolError) as info:
        parse_reply_line(line)
    assert info.value.code is Code.BAD_REQUEST


@pytest.mark.parametrize("line", [b"HN/01 CONNECT a", b"HN/001 CONNECT a", b"HN/+1 CONNECT a", b"HN/1_0 CONNECT a"])
def test_non_canonical_request_versions_are_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_line(line)
    assert info.value.code is Code.BAD_REQUEST


# -- plane detection ----------------------------------------------------------------------


@pytest.mark.parametrize("n", range(len(b"HN/")))
def test_detect_partial_magic_needs_more(n: int) -> None:
    assert detect_plane(b"HN/"[:n]) is None


@pytest.mark.parametrize("n", range(len(GRPC_PREFACE)))
def test_detect_partial_grpc_preface_needs_more(n: int) -> None:
    assert detect_plane(GRPC_PREFACE[:n]) is None


@pytest.mark.parametrize(
    ("prefix", "plane"),
    [
        (b"HN/", Plane.DATA),
        (b"HN/1 CONNECT a\n", Plane.DATA),
        (b"HN/9", Plane.DATA),  # the version is the parser's business (505), not the detector's
        (GRPC_PREFACE, Plane.GRPC),
        (GRPC_PREFACE + b"\x00\x00\x12\x04", Plane.GRPC),
        (b"HX", Plane.UNKNOWN),
        (b"hn/", Plane.UNKNOWN),
        (b"GET / HTTP/1.1\r\n", Plane.HTTP),
        (b"POST /x HTTP/1.1\r\n", Plane.HTTP),
        (b"PUT ", Plane.HTTP),
        (b"GETX", Plane.UNKNOWN),
        (b"get / HTTP/1.1", Plane.UNKNOWN),
        (b"\x16\x03\x01", Plane.UNKNOWN),
        (b"\x00", Plane.UNKNOWN),
        (b"PRI * HTTP/1.1", Plane.UNKNOWN),
        (b"PRX", Plane.UNKNOWN),
        (GRPC_PREFACE[:-1] + b"X", Plane.UNKNOWN),
        (b"SSH-2.0-", Plane.UNKNOWN),
    ],
)
def test_detect_plane(prefix: bytes, plane: Plane) -> None:
    assert detect_plane(prefix) is plane


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_detect_plane_is_consistent_with_growing_prefixes(data: bytes) -> None:
    verdicts = [detect_plane(data[:n]) for n in range(len(data) + 1)]
    decided = [v for v in verdicts if v is not None]
    # once decided, more bytes never change the verdict
    assert len(set(decided)) <= 1
    if decided:
        first = verdicts.index(decided[0])
        assert all(v is decided[0] for v in verdicts[first:])


# -- fuzz: only ProtocolError, ever ----------------------------------------------------------

_PIECES = st.sampled_from(
    [
        b"HN/1 ",
        b"HN/2 ",
        b"CONNECT ",
        b"TICKET ",
        b"POOL ",
        b"a=b ",
        b"=",
        b" ",
        b"\r",
        b"\n",
        b"\x00",
        b"\xff",
        b"200 ok",
    ]
)
_FUZZ = st.lists(st.one_of(st.binary(max_size=48), _PIECES), max_size=30).map(b"".join) | st.binary(max_size=1300)


@settings(max_examples=2000, deadline=None)
@given(data=_FUZZ, cuts=st.lists(st.integers(min_value=0, max_value=1400), max_size=12), eof=st.booleans())
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes, cuts: list[int], eof: bool) -> None:
    chunks = _chunks(data, [c for c in cuts if c <= len(data)])
    if eof:
        chunks.append(b"")
    codes: list[Code] = []
    for parser in (RequestParser(), ReplyParser()):
        try:
            for chunk in chunks:
                parser.receive_data(chunk)
                while parser.next_event() is not NEED_DATA:
                    pass
        except ProtocolError as exc:
            codes.append(exc.code)
        # trailing never hands back more than was fed
        assert len(parser.trailing()) <= len(data)
    assert all(isinstance(c, Code) and c is not Code.OK for c in codes)


# -- hop counting across direct hops -------------------------------------------------------------


def test_the_next_request_line_is_stamped_with_the_hop_count() -> None:
    data = b"HN/1 CONNECT 10.0.0.5:22 key=k ts=1 nonce=n mac=m depth=0\nPAYLOAD"
    stamped = stamp_depth(data, 3)
    assert stamped is not None
    line, _, rest = stamped.partition(b"\n")
    req = parse_request_line(line)
    assert (req.arg, req.fields["depth"], req.fields["key"], rest) == ("10.0.0.5:22", "3", "k", b"PAYLOAD")
    assert request_depth(req) == 3


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", b""),
        (b"SSH-2.0-x\r\n", b"SSH-2.0-x\r\n"),  # a payload, not a request line
        (b"HN/1 CONNECT a", None),  # cut: read the rest first
        (b"HN/1 FETCH a\nrest", b"HN/1 FETCH a\nrest"),  # malformed: the next node says why
    ],
)
def test_what_is_not_a_complete_request_line_is_left_alone(data: bytes, want: bytes | None) -> None:
    assert stamp_depth(data, 1) == want


def test_a_line_with_no_room_for_the_stamp_is_refused() -> None:
    full = b"HN/1 CONNECT a " + b" ".join(f"f{i}=v".encode() for i in range(16)) + b"\n"
    with pytest.raises(ProtocolError) as err:
        stamp_depth(full, 2)
    assert err.value.code is Code.BAD_REQUEST


@pytest.mark.parametrize(("text", "want"), [("4", 4), ("0", 0), ("x", 0), ("-1", 0), ("99999", 0)])
def test_request_depth_reads_only_small_numbers(text: str, want: int) -> None:
    assert request_depth(Request(Verb.CONNECT, "a", {"depth": text})) == want
