"""The outbox entry a write stores beside the flow, and the OIH envelope it is published in.

No broker here: services build entries with :func:`pending_event`; the relay renders them
with :func:`envelope` when it publishes, and sends the W3C trace context stored with each
entry (:func:`trace_of`) as the message's ``traceparent``/``tracestate`` headers.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from flow_repository.adapters.store.base import utcnow
from flow_repository.domain import trace
from flow_repository.domain.flow import public_flow

SERVICE_NAME = "flow-repository"
FLOW_PAYLOAD = "flow"  # the payload is the flow itself, rendered when the event is published


def pending_event(
    name: str, payload: Mapping[str, Any] | None = None, *, revision: int | None = None,
    **flow_overrides: Any,
) -> dict[str, Any]:
    """An outbox entry. Without ``payload`` the event carries the flow, with ``flow_overrides``.

    ``revision``, when the change's revision is known before it is written, goes out as the
    ``revision`` header, so a subscriber can order a flow's changes. The trace context of
    the work in hand (a request, a report), if any, is stored with the entry: the outbox
    carries it across to the relay's publish, which may happen later, elsewhere.
    """
    now = utcnow()
    event: dict[str, Any] = {
        "eventId": uuid.uuid4().hex,
        "name": name,
        "storedAt": now,
        "createdAt": int(now.timestamp() * 1000),
    }
    if revision is not None:
        event["revision"] = revision
    context = trace.current()
    if context is not None:
        event.update(trace.headers_of(context))
    if payload is None:
        event["payloadKind"] = FLOW_PAYLOAD
        event["flowOverrides"] = dict(flow_overrides)
    else:
        event["payload"] = dict(payload)
    return event


def envelope(event: Mapping[str, Any], flow: Mapping[str, Any]) -> dict[str, Any]:
    """The OIH wire format of an outbox entry: ``{headers: {...}, payload: {...}}``."""
    if event.get("payloadKind") == FLOW_PAYLOAD:
        payload = {**public_flow(flow), **event.get("flowOverrides", {})}
    else:
        payload = dict(event.get("payload") or {})
    headers = {
        "name": event["name"],
        "createdAt": event["createdAt"],
        "serviceName": SERVICE_NAME,
        "eventId": event["eventId"],
    }
    if "revision" in event:
        headers["revision"] = event["revision"]
    return {"headers": headers, "payload": payload}


def trace_of(event: Mapping[str, Any]) -> trace.TraceContext | None:
    """The trace context stored with an outbox entry (checked again: stored data is input)."""
    return trace.parse(event.get(trace.TRACEPARENT), event.get(trace.TRACESTATE))
