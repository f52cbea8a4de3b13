"""What every store backend shares: the outage error, the clock, and MongoDB-safe keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# Keys MongoDB cannot hold (or would read as operators / paths) are escaped reversibly:
# "~" is the escape character itself, so the mapping stays one-to-one.
_KEY_ESCAPES = {"~": "~t", ".": "~d", "$": "~s", "\x00": "~0"}
_KEY_UNESCAPES = {escaped[1]: raw for raw, escaped in _KEY_ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[~.$\x00]")
_ESCAPED = re.compile(r"~(.)", re.DOTALL)


class StoreUnavailable(Exception):
    """MongoDB could not be reached; the request may be retried later."""

    def __init__(self, cause: Exception) -> None:
        # The class name only: pymongo's text names hosts and topology, which /healthcheck
        # would otherwise show to anyone.
        super().__init__(f"MongoDB is unavailable: {type(cause).__name__}")


def utcnow() -> datetime:
    """Now, at the millisecond precision MongoDB keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def encode_keys(value: Any) -> Any:
    """Escape user-supplied keys so that MongoDB stores them verbatim."""
    if isinstance(value, Mapping):
        return {
            (_NEEDS_ESCAPE.sub(lambda m: _KEY_ESCAPES[m.group()], key)): encode_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [encode_keys(item) for item in value]
    return value


def decode_keys(value: Any) -> Any:
    """Undo :func:`encode_keys`; stored dates come back timezone-aware (UTC)."""
    if isinstance(value, Mapping):
        return {
            (_ESCAPED.sub(lambda m: _KEY_UNESCAPES.get(m.group(1), m.group()), key)
             if "~" in key else key): decode_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [decode_keys(item) for item in value]
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
