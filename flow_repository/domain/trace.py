"""W3C trace context (``traceparent``, ``tracestate``): strict parsing and the current one.

Pure Python, no OpenTelemetry: the service carries a caller's trace context from a request
into the outbox, the broker's message headers, the history and the log lines whether or not
tracing is on. A header that does not follow the W3C Trace Context format exactly is ignored
(never an error, never stored): see :func:`parse`.

The context of the work in hand (a request, a report being applied, a relay's publish) is
kept in a context variable: :func:`current` reads it, :func:`use` sets it for a block.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Where a request's trace context waits in the WSGI environ for the access log line.
ENVIRON_KEY = "flow_repository.trace"

# version "00": exactly 55 characters; a later version may append "-..." fields (W3C 3.2.4)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
MAX_TRACESTATE_LENGTH = 512
MAX_TRACESTATE_MEMBERS = 32
# list-member = key "=" value; key: simple or multi-tenant ("tenant@system")
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A valid W3C trace context: ids as lowercase hex, ``flags`` (bit 0: sampled)."""

    trace_id: str
    span_id: str
    flags: int = 0
    state: str | None = None

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` header value (version 00) of this context."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse(traceparent: object, tracestate: object = None) -> TraceContext | None:
    """The context a ``traceparent`` header names, or None when it is absent or malformed.

    Strict, as W3C Trace Context asks: lowercase hex only, version ``ff`` and all-zero ids
    refused, version 00 of exactly 55 characters (a later version may carry more fields,
    after a ``-``, which are ignored). A malformed ``tracestate`` is dropped on its own
    (the ``traceparent`` still counts), as the specification says.
    """
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    if not isinstance(traceparent, str) or len(traceparent) < 55 or len(traceparent) > 512:
        return None
    value = traceparent.strip(" \t")
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceContext(trace_id, span_id, int(flags, 16), parse_tracestate(tracestate))


def parse_tracestate(tracestate: object) -> str | None:
    """A ``tracestate`` header, normalised (blanks around members dropped), or None when it
    is absent, empty or malformed."""
    if isinstance(tracestate, bytes):
        tracestate = tracestate.decode("ascii", "replace")
    if not isinstance(tracestate, str) or len(tracestate) > MAX_TRACESTATE_LENGTH:
        return None
    members = [member.strip(" \t") for member in tracestate.split(",")]
    members = [member for member in members if member]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    keys = set()
    for member in members:
        if _TRACESTATE_MEMBER.fullmatch(member) is None:
            return None
        key = member.partition("=")[0]
        if key in keys:  # a key appears at most once
            return None
        keys.add(key)
    return ",".join(members)


_CURRENT: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "trace_context", default=None)


def current() -> TraceContext | None:
    """The trace context of the work in hand, if any."""
    return _CURRENT.get()


@contextmanager
def use(context: TraceContext | None) -> Iterator[TraceContext | None]:
    """Make ``context`` the current one for the block (None: no trace)."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def enter(context: TraceContext | None) -> contextvars.Token:
    """Make ``context`` current until :func:`leave` is called with the returned token
    (for request hooks, which open and close in separate functions)."""
    return _CURRENT.set(context)


def leave(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


def headers_of(context: TraceContext | None) -> dict[str, str]:
    """The W3C headers that carry ``context`` on (none for no context)."""
    if context is None:
        return {}
    headers = {TRACEPARENT: context.traceparent}
    if context.state:
        headers[TRACESTATE] = context.state
    return headers
