"""One error taxonomy: every error HomeNet raises on purpose has a code, every code one gRPC
status, and a code survives the trip through a query result and back (values in, verdicts out)."""

from __future__ import annotations

import grpc
import pytest

from homenet.control.errors import CODE_OF_STATUS, STATUS, code_of_status_value, status_of, status_value
from homenet.control.rl import IdentityBusy, Refused
from homenet.control.stream import Disconnected
from homenet.node.address import AddressError
from homenet.node.auth import AuthError
from homenet.node.errors import Code, HomeNetError
from homenet.node.keys import KeyFileError
from homenet.node.listeners import (
    BadListenId,
    ListenerConflict,
    ListenerForbidden,
    ListenerLoop,
    ListenerNotFound,
    ListenerOffline,
    TakeoverWar,
)
from homenet.node.preamble import Reply, ReplyParser, encode_reply
from homenet.node.query import QUERY_CODES, QueryError
from homenet.node.settings import SettingsError
from homenet.node.tickets import TicketExpired


def test_every_code_has_one_status() -> None:
    assert set(STATUS) == set(Code)


def test_a_bare_status_maps_back_to_a_code_with_that_status() -> None:
    for status, code in CODE_OF_STATUS.items():
        assert STATUS[code] is status


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (ListenerConflict("x"), Code.CONFLICT, grpc.StatusCode.ALREADY_EXISTS),
        (TakeoverWar("x"), Code.LOCKED, grpc.StatusCode.ABORTED),
        (BadListenId("x"), Code.BAD_REQUEST, grpc.StatusCode.INVALID_ARGUMENT),
        (ListenerLoop("x"), Code.LOOP, grpc.StatusCode.FAILED_PRECONDITION),
        (ListenerForbidden("x"), Code.FORBIDDEN, grpc.StatusCode.PERMISSION_DENIED),
        (ListenerNotFound("x"), Code.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (ListenerOffline("x"), Code.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (AuthError("x"), Code.UNAUTHORIZED, grpc.StatusCode.UNAUTHENTICATED),
        (AuthError("x", forbidden=True), Code.FORBIDDEN, grpc.StatusCode.PERMISSION_DENIED),
        (TicketExpired("x"), Code.UNAUTHORIZED, grpc.StatusCode.UNAUTHENTICATED),
        (QueryError("deadline", "x"), Code.GATEWAY_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),
        (Disconnected("x"), Code.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (Refused("x"), Code.FORBIDDEN, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_errors_carry_their_code_and_status(exc: HomeNetError, code: Code, status: grpc.StatusCode) -> None:
    assert exc.code is code
    assert status_of(exc) is status


def test_anything_else_is_internal() -> None:
    assert status_of(RuntimeError("bug")) is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("exc", [SettingsError("x"), AddressError("x"), KeyFileError("x"), IdentityBusy("x")])
def test_usage_errors_say_so(exc: HomeNetError) -> None:
    assert exc.usage
    assert str(exc) == "x"


def test_usage_errors_are_still_value_errors() -> None:  # callers that catch ValueError keep working
    assert isinstance(SettingsError("x"), ValueError)
    assert isinstance(AddressError("x"), ValueError)


@pytest.mark.parametrize("kind", sorted(QUERY_CODES))
def test_a_query_error_survives_a_query_result(kind: str) -> None:
    sent = QueryError(kind, "why")
    got = QueryError.from_code(code_of_status_value(status_value(sent.code)), sent.message)
    assert (got.kind, got.message) == (kind, "why")


def test_an_unknown_query_kind_is_a_failure() -> None:
    assert QueryError("weird", "x").kind == "failed"
    assert QueryError.from_code(Code.TOO_LARGE, "x").kind == "failed"


# -- structured reply fields ----------------------------------------------------------------
def _reply(line: bytes) -> Reply:
    p = ReplyParser()
    p.receive_data(line)
    event = p.next_event()
    assert isinstance(event, Reply)
    return event


def test_an_ok_reply_carries_fields() -> None:
    line = encode_reply(Code.OK, fields={"hop": "3"})
    assert line == b"HN/1 200 ok hop=3\n"
    reply = _reply(line)
    assert (reply.fields, reply.reason) == ({"hop": "3"}, "")
    assert reply.encode() == line


def test_error_reasons_are_text_even_when_they_look_like_fields() -> None:
    reply = _reply(b"HN/1 403 forbidden a=b\n")
    assert (reply.reason, reply.fields) == ("a=b", {})


def test_an_ok_reply_with_free_text_keeps_it_as_text() -> None:
    reply = _reply(b"HN/1 200 ok spliced to 10.0.0.1:22\n")
    assert (reply.reason, reply.fields) == ("spliced to 10.0.0.1:22", {})
