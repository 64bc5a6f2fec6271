"""Coverage-guided fuzzing of the data-plane parsers with atheris (libFuzzer for Python).

Run it by hand (CI does not need atheris: tests/unit/test_fuzz_corpus.py replays the corpus
through :func:`target` on every run)::

    pip install atheris
    python tests/fuzz/fuzz_preamble.py tests/fuzz/corpus -max_total_time=60

libFuzzer adds every input that finds new coverage to the FIRST directory it is given; to keep
the committed corpus small, give it a scratch directory first and the seeds second::

    mkdir -p /tmp/hn-corpus && python tests/fuzz/fuzz_preamble.py /tmp/hn-corpus tests/fuzz/corpus -max_total_time=60

A crash writes ``crash-<sha1>`` in the current directory: copy it into tests/fuzz/corpus/ (it
then stays a regression test) and fix the parser.

Input format: byte 0 picks the target (``R`` request parser, ``P`` reply parser, ``U`` URL /
hop / endpoint parsers, anything else: all of them); byte 1 picks how the rest is cut into
chunks (``n % 16``: 0 = one chunk, else chunks of that many bytes); the rest is the input.
"""

from __future__ import annotations

import sys

from homenet.node.address import AddressError, parse_endpoint, parse_hop, parse_url
from homenet.node.preamble import (
    MAX_LINE,
    NEED_DATA,
    ProtocolError,
    Reply,
    ReplyParser,
    Request,
    RequestParser,
    detect_plane,
    parse_request_line,
)

#: Requests (or replies) taken from one input at most: enough for any chain (8 hops) and more.
MAX_EVENTS = 64


def _chunks(data: bytes, size: int) -> list[bytes]:
    if size == 0 or not data:
        return [data] if data else []
    return [data[i : i + size] for i in range(0, len(data), size)]


def _drain(parser: RequestParser | ReplyParser, chunks: list[bytes], eof: bool) -> list[Request | Reply]:
    """Feed ``chunks`` (then EOF if asked), taking events as they come; ProtocolError passes."""
    taken: list[Request | Reply] = []
    for chunk in [*chunks, b""] if eof else chunks:
        parser.receive_data(chunk)
        while len(taken) < MAX_EVENTS:
            event = parser.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Request | Reply), event
            taken.append(event)
    return taken


def _project_error(message: str, code: int = 400) -> None:
    """The parsers' own errors: one non-empty line, and a 4xx/5xx reply code."""
    assert message, "an error without a message"
    assert "\n" not in message, message
    assert 400 <= code < 600, code


def _check(kind: type[RequestParser] | type[ReplyParser], chunks: list[bytes], data: bytes) -> None:
    parser = kind()
    try:
        taken = _drain(parser, chunks, eof=False)
    except ProtocolError as exc:
        _project_error(exc.reason, int(exc.code))
        return
    for event in taken:  # what was accepted writes back to a line that parses the same
        line = event.encode()
        assert len(line) <= MAX_LINE
        if isinstance(event, Request):
            assert parse_request_line(line[:-1]) == event
    if len(taken) < MAX_EVENTS:
        rest = parser.trailing()  # the bytes after the last event, untouched
        assert data.endswith(rest), (data, rest)
        assert b"\n" not in rest, rest  # else an event or an error was due
        assert len(rest) < MAX_LINE, rest
    try:  # and at EOF: more events or the parser's own error, nothing else
        _drain(kind(), chunks, eof=True)
    except ProtocolError as exc:
        _project_error(exc.reason, int(exc.code))


def _addresses(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for parse in (parse_url, parse_hop, parse_endpoint):
        try:
            parse(text)
        except AddressError as exc:
            _project_error(str(exc))
    try:
        route = parse_url(text)
    except AddressError:
        return
    assert parse_url(str(route)) == route  # a parsed URL prints back to itself


def target(data: bytes) -> None:
    """One fuzz input: only the project's own errors may come out of the parsers."""
    if len(data) < 2:
        return
    kind, size, body = data[0:1], data[1] % 16, data[2:]
    detect_plane(body)
    chunks = _chunks(body, size)
    every = kind not in (b"R", b"P", b"U")
    if kind == b"R" or every:
        _check(RequestParser, chunks, body)
    if kind == b"P" or every:
        _check(ReplyParser, chunks, body)
    if kind == b"U" or every:
        _addresses(body)


def main() -> None:
    import importlib

    atheris = importlib.import_module("atheris")  # optional: only this harness needs it
    atheris.instrument_all()  # coverage feedback from the parsers (already imported above)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
