"""gunicorn's access log as JSON lines built by a JSON encoder, whatever the request holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from gunicorn.glogging import Logger

from flow_repository.domain import trace
from flow_repository.server.redaction import redact


def _text(value: Any) -> str | None:
    """A WSGI string (bytes decoded as latin-1) as the UTF-8 text the client meant, with any
    credential it holds (``?access_token=``, userinfo in a URL) redacted."""
    if value is None:
        return None
    try:
        text = str(value).encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        text = str(value)
    return redact(text)


class JsonAccessLogger(Logger):
    """Writes one JSON object per request; json.dumps escapes newlines, quotes and controls.

    A request in a trace names it (``traceId``, ``spanId``), as every log line inside it does.
    Query, path, referer and user agent are redacted (flow_repository/server/redaction.py): clients
    and proxies do put tokens in URLs.
    """

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        status = str(resp.status).split(None, 1)[0]
        headers = {name.lower(): value for name, value in (resp.headers or [])}
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "remote": environ.get("REMOTE_ADDR"),
            "method": _text(environ.get("REQUEST_METHOD")),
            "path": _text(environ.get("PATH_INFO")),
            "query": _text(environ.get("QUERY_STRING")),
            "status": int(status) if status.isascii() and status.isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "durationMs": round(request_time.total_seconds() * 1000, 3),
            "requestId": _text(headers.get("x-request-id")),
            "userAgent": _text(environ.get("HTTP_USER_AGENT")),
            "referer": _text(environ.get("HTTP_REFERER")),
        }
        context = environ.get(trace.ENVIRON_KEY)
        if isinstance(context, trace.TraceContext):  # the request came in, or made, a trace
            entry["traceId"] = context.trace_id
            entry["spanId"] = context.span_id
        # No format arguments: a "%" in the entry is not a logging placeholder.
        self.access_log.info(json.dumps(entry))
