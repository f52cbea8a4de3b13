"""Health and metrics routes: /healthcheck (dependencies), /livez (process alive), /metrics."""

from __future__ import annotations

from flask import Response, jsonify
from flask_smorest import Blueprint

from ..store import StoreUnavailable
from . import runtime

blp = Blueprint("health", __name__, description="Health and metrics")

HEALTH_BODY = {"application/json": {"schema": {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["pass", "warn", "fail"]},
        "details": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}}}


@blp.route("/healthcheck", methods=["GET"])
@blp.doc(security=[], responses={
    200: {"description": "MongoDB reachable (warn: RabbitMQ is not)", "content": HEALTH_BODY},
    503: {"description": "MongoDB unreachable", "content": HEALTH_BODY}})
def healthcheck() -> Response:
    """MongoDB and queue status. A queue outage is a warning: events wait in the outbox."""
    details = runtime().health()
    mongo_ok = details["mongoDB"]["status"] == "pass"
    queue_ok = details["queue"]["status"] == "pass"
    status = "pass" if mongo_ok and queue_ok else ("warn" if mongo_ok else "fail")
    response = jsonify({"status": status, "details": details})
    response.status_code = 200 if mongo_ok else 503
    return response


@blp.route("/livez", methods=["GET"])
@blp.doc(security=[], responses={200: {"description": "The process answers",
                                       "content": HEALTH_BODY}})
def livez() -> Response:
    """The process answers; touches neither MongoDB nor RabbitMQ (Kubernetes liveness)."""
    return jsonify({"status": "pass"})


@blp.route("/metrics", methods=["GET"])
@blp.doc(security=[], responses={200: {"description": "Prometheus text exposition",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics() -> Response:
    """Prometheus metrics of this process."""
    state = runtime()
    try:
        state.refresh_gauges()
    except StoreUnavailable:
        pass  # the counters are still worth scraping while MongoDB is away
    return Response(state.metrics.render(), content_type=state.metrics.content_type)
