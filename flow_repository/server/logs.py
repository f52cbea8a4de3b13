"""Structured logging: one JSON object per line, carrying the current request and trace ids."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from flow_repository.domain import trace
from flow_repository.server.redaction import redact, redact_value

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Render a record as a single JSON line, with every credential in it redacted.

    Message, ``extra`` fields and tracebacks all pass through redaction.redact: a token in a
    query string, an Authorization value or a password in a URL never reaches the log.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["requestId"] = request_id
        context = trace.current()
        if context is not None:  # written inside a trace (a request's, a report's)
            entry["traceId"] = context.trace_id
            entry["spanId"] = context.span_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact_value(value, key)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every log line of the process to stderr as JSON (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers = [handler]
    root.setLevel(level.upper())
    # pika logs every failed reconnect as an ERROR with a traceback; our own warning says it once.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    # With its collector down, the OpenTelemetry SDK warns "Queue full, dropping Span" for
    # every span it drops: a record built per request (then filtered as a duplicate). The
    # exporter's own errors already say the collector is away.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
