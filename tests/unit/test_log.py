"""Log formatting: structured fields, and secrets masked whatever the call site passes."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest

from homenet.node.log import JsonFormatter, TextFormatter, fields, mask
from homenet.node.relay import printable

SECRET = "s3cr3t-Value-0123456789"


def record(event: str = "session.open", level: int = logging.INFO, exc: bool = False, **kv: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError:
            exc_info = sys.exc_info()
    rec = logging.getLogger("homenet.test").makeRecord(
        "homenet.test", level, __file__, 1, event, (), exc_info, extra=fields(**kv)
    )
    rec.created = 1795680000.123  # 2026-11-26T08:00:00.123Z
    rec.msecs = 123.0
    return rec


def text(**kv: Any) -> str:
    return TextFormatter().format(record(**kv))


def as_json(**kv: Any) -> dict[str, Any]:
    out = json.loads(JsonFormatter().format(record(**kv)))
    assert isinstance(out, dict)
    return out


def test_fields_namespace() -> None:
    assert fields(id=3, peer="x") == {"hn": {"id": 3, "peer": "x"}}


@pytest.mark.parametrize(
    "key",
    ["secret", "token", "ticket", "password", "key", "resume_secret", "api_key", "Ticket", "TOKEN", "pool_ticket"],
)
def test_mask_secret_looking_keys(key: str) -> None:
    assert mask(key, SECRET) == "s3cr…"
    assert mask(key, "short") == "…"
    assert mask(key, "12345678") == "…"  # 8 characters: nothing kept
    assert mask(key, "123456789") == "1234…"
    assert mask(key, 123456789012) == "1234…"


@pytest.mark.parametrize("key", ["id", "peer", "target", "key_id", "keyid", "KEY_ID", "error", "bytes_up"])
def test_mask_leaves_other_keys(key: str) -> None:
    assert mask(key, SECRET) == SECRET
    assert mask(key, 42) == 42


def test_text_format() -> None:
    line = text(id=3, client="127.0.0.1:5000")
    assert line == "2026-11-26T08:00:00.123Z INFO  session.open id=3 client=127.0.0.1:5000"


def test_text_format_quotes_awkward_values() -> None:
    line = text(reason='a b "c"', empty="", eq="k=v", nl="x\ny")
    assert line.endswith(' reason="a b \\"c\\"" empty="" eq="k=v" nl="x\\ny"')
    assert "\n" not in line


def test_control_characters_never_reach_the_terminal() -> None:
    """A peer's name with an escape sequence (ESC [31m, BEL) is escaped, not written raw."""
    line = text(name="\x1b[31mred\x07", plain="x\x00y")
    assert not any(c in line for c in "\x1b\x07\x00")
    assert line.endswith(' name="\\u001b[31mred\\u0007" plain="x\\u0000y"')


def test_a_listener_s_name_is_stored_printable() -> None:
    assert printable("home\x1b[2J\x07 Ünï ☃") == "home?[2J? Ünï ☃"


@pytest.mark.parametrize("key", ["ticket", "token", "secret", "password", "key", "resume_secret"])
def test_text_masks_secrets(key: str) -> None:
    line = text(**{key: SECRET, "peer": "p"})
    assert SECRET not in line
    assert SECRET[4:] not in line
    assert f"{key}=s3cr…" in line
    assert "peer=p" in line


@pytest.mark.parametrize("key", ["ticket", "token", "secret", "password", "key", "resume_secret"])
def test_json_masks_secrets(key: str) -> None:
    out = as_json(**{key: SECRET, "peer": "p"})
    assert out[key] == "s3cr…"
    assert out["peer"] == "p"
    assert SECRET not in json.dumps(out)


def test_json_format() -> None:
    out = as_json(event="node.listening", address="hn://127.0.0.1:6969", n=3, ok=True)
    assert out == {
        "ts": 1795680000.123,
        "level": "info",
        "logger": "homenet.test",
        "event": "node.listening",
        "address": "hn://127.0.0.1:6969",
        "n": 3,
        "ok": True,
    }


def test_json_is_one_line_and_stringifies_odd_values() -> None:
    line = JsonFormatter().format(record(reason="a\nb", obj=frozenset({1})))
    assert "\n" not in line
    out = json.loads(line)
    assert out["reason"] == "a\nb"
    assert out["obj"] == "frozenset({1})"


def test_levels() -> None:
    assert " WARNING " in TextFormatter().format(record(level=logging.WARNING))
    assert json.loads(JsonFormatter().format(record(level=logging.ERROR)))["level"] == "error"


def test_exception_is_one_field() -> None:
    line = TextFormatter().format(record(exc=True, peer="p"))
    assert line.endswith('error="ConnectionResetError: peer went away"')
    assert "Traceback" not in line
    assert "\n" not in line
    out = json.loads(JsonFormatter().format(record(exc=True)))
    assert out["error"] == "ConnectionResetError: peer went away"


def test_records_without_fields() -> None:
    rec = logging.makeLogRecord({"msg": "plain", "levelname": "INFO", "name": "homenet"})
    assert TextFormatter().format(rec).endswith(" plain")
    assert json.loads(JsonFormatter().format(rec))["event"] == "plain"


def test_masking_is_not_fooled_by_the_value_type() -> None:
    line = text(ticket=b"0123456789abcdef")
    assert "0123456789abcdef" not in line
    out = as_json(token=["abcdefgh", "ijklmnop"])
    assert "ijklmnop" not in json.dumps(out)


@pytest.mark.parametrize("key", ["authorization", "passwd", "credentials", "cookie", "Set-Cookie"])
def test_more_secret_looking_keys_are_masked(key: str) -> None:
    assert SECRET not in text(**{key: SECRET})
    assert as_json(**{key: SECRET})[key] == "s3cr…"
