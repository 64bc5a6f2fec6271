"""Structured, levelled logs: ``event key=value ...`` as text, or one JSON object per line.

Call sites pass an event name and fields: ``log.info("session.open", extra=fields(id=3))``.
Values of keys that look secret are masked whatever the call site passes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_KEYS = ("secret", "token", "ticket", "password", "passwd", "key", "authorization", "credential", "cookie")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def fields(**kv: Any) -> dict[str, Any]:
    """Wrap structured fields for ``extra=`` (one namespace, no clash with LogRecord)."""
    return {"hn": kv}


def mask(key: str, value: Any) -> Any:
    """Mask a value whose key names a secret (keeps 4 chars so operators can correlate);
    nested mappings are masked the same way."""
    if any(s in key.lower() for s in _SECRET_KEYS) and key.lower() not in ("key_id", "keyid"):
        text = str(value)
        return text[:4] + "…" if len(text) > 8 else "…"
    if isinstance(value, dict):
        return {k: mask(str(k), v) for k, v in value.items()}
    return value


def _kv(record: logging.LogRecord) -> dict[str, Any]:
    raw = getattr(record, "hn", None)
    return {k: mask(k, v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _quote(value: Any) -> str:
    text = str(value)
    if not text or not text.isprintable() or any(c in text for c in ' "='):
        return json.dumps(text)  # control characters escaped: a peer's name cannot drive a terminal
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-26T08:00:00.123Z INFO  session.open id=3 client=127.0.0.1:5000``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}.{int(record.msecs):03d}Z", f"{record.levelname:<5}", record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in _kv(record).items()]
        if record.exc_info:
            parts.append("error=" + _quote(self.formatException(record.exc_info).splitlines()[-1]))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for k, v in _kv(record).items():  # never let a field overwrite the envelope
            out[f"field_{k}" if k in out else k] = v
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send HomeNet's logs to stderr in the chosen format (stdout is for READY lines)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("homenet")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # grpc and asyncio chatter only when asked for
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
