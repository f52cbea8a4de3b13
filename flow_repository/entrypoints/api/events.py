"""GET /flows/events: the caller's flow changes as Server-Sent Events (docs/watch.rst)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, request
from flask_smorest import Blueprint

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import StoreUnavailable
from flow_repository.contract import error_body
from flow_repository.contract.schemas import WATCH_FILTERS, WatchArgumentsSchema, watch_query
from flow_repository.domain.flow import InvalidFlow
from flow_repository.services.watch import StreamEnded, Watcher, WatchRefused, parse_position

from . import authenticate_first, error_responses, runtime, settings

blp = Blueprint("events", __name__, description="Watch flows change (Server-Sent Events)")

RETRY_MILLISECONDS = 2000  # how soon an EventSource reconnects after the stream ends
EVENT_STREAM = {
    "description": "A stream of `id:`, `event:` (created, modified, restored, status, "
                   "deleted) and `data:` (JSON: id, revision, status, change, at; flow with "
                   "`include=flow`), with `: keep-alive` comments between events",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
LAST_EVENT_ID = {"in": "header", "name": "Last-Event-ID", "schema": {"type": "string"},
                 "description": "resume after this event id (EventSource sends it itself)"}


def sse(seq: int, name: str, data: Any) -> str:
    """One event in the text/event-stream format."""
    return f"id: {seq}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@blp.route("/flows/events", methods=["GET"])
@authenticate_first("flow_read_permission")
@blp.arguments(WatchArgumentsSchema(), location="query", error_status_code=400)
@blp.doc(parameters=[LAST_EVENT_ID], responses={
    200: EVENT_STREAM, **error_responses(400, 401, 403, 410, 429, 503)})
def watch_flows(principal: Principal, arguments: dict[str, Any]) -> Response:
    """Stream the changes of the flows the caller may read, resumable with Last-Event-ID."""
    unknown = sorted(name for name in request.args
                     if name.startswith("filter[") and name not in WATCH_FILTERS)
    if unknown:
        raise InvalidFlow(f"unknown filter {unknown[0][:60]!r}; the filters are "
                          f"{', '.join(sorted(WATCH_FILTERS))}")
    if request.method == "HEAD":  # what a GET would answer, without opening a stream
        return Response(mimetype="text/event-stream")
    header = request.headers.get("Last-Event-ID")
    since = parse_position(header if header is not None else arguments.get("since"))
    names = settings()
    watch = runtime().watch
    assert watch is not None
    watcher = watch.open(principal, since, watch_query(arguments))
    # A reader that takes no bytes for this long is dropped (its thread and slot freed),
    # never buffered for: each event is read from the store only once the last one left.
    client = request.environ.get("gunicorn.socket")
    if isinstance(client, socket.socket):
        client.settimeout(names.watch_send_timeout_seconds)
    stream = events(watcher, include_flow=arguments.get("include") == "flow",
                    heartbeat=names.watch_heartbeat_seconds, lasts=names.watch_max_seconds)
    response = Response(stream, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def events(watcher: Watcher, *, include_flow: bool, heartbeat: float, lasts: float
           ) -> Iterator[str]:
    """The stream's text: events as they come, a comment every ``heartbeat`` seconds
    without one, and an end after ``lasts`` seconds or when the process stops."""
    with watcher:
        yield f"retry: {RETRY_MILLISECONDS}\n: watching changes after {watcher.position}\n\n"
        ends = time.monotonic() + lasts
        try:
            while (left := ends - time.monotonic()) > 0:
                changes = watcher.next_changes(min(heartbeat, left))
                if not changes:
                    yield ": keep-alive\n\n"
                    continue
                yield "".join(sse(change["seq"], change["change"],
                                  watcher.event(change, include_flow=include_flow))
                              for change in changes)
            yield ": stream time is up; reconnect with Last-Event-ID\n\n"
        except StreamEnded:
            yield ": the server is stopping; reconnect with Last-Event-ID\n\n"
        except WatchRefused as error:
            yield sse(watcher.position, "error", error_body(error.status, *error.messages()))
        except StoreUnavailable:
            yield sse(watcher.position, "error", error_body(
                503, "Database is unavailable; reconnect with Last-Event-ID."))
