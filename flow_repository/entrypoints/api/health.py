"""Health and metrics routes: /healthcheck and /readyz (dependencies), /livez (process alive),
/metrics."""

from __future__ import annotations

from flask import Response, jsonify, request
from flask_smorest import Blueprint
from werkzeug.exceptions import Unauthorized

from . import error_responses, runtime

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
    status, body = runtime().health(queue_required=False)
    response = jsonify(body)
    response.status_code = status
    return response


@blp.route("/livez", methods=["GET"])
@blp.doc(security=[], responses={200: {"description": "The process answers",
                                       "content": HEALTH_BODY}})
def livez() -> Response:
    """The process answers; touches neither MongoDB nor RabbitMQ (Kubernetes liveness)."""
    return jsonify({"status": "pass"})


@blp.route("/readyz", methods=["GET"])
@blp.doc(security=[], responses={
    200: {"description": "Ready: MongoDB reachable", "content": HEALTH_BODY},
    503: {"description": "Not ready: MongoDB unreachable", "content": HEALTH_BODY}})
def readyz() -> Response:
    """Kubernetes readiness: /healthcheck's answer (also served on HEALTH_PORT)."""
    return healthcheck()


@blp.route("/metrics", methods=["GET"])
@blp.doc(security=[], responses={
    200: {"description": "Prometheus text exposition",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    **error_responses(401, description="METRICS_TOKEN is set and the request does not carry "
                                       "it as Bearer")})
def metrics() -> Response:
    """Prometheus metrics of this process (needs ``Bearer $METRICS_TOKEN`` when that is set)."""
    state = runtime()
    if not state.metrics_allowed(request.headers.get("Authorization")):
        raise Unauthorized("/metrics needs the metrics token as a Bearer token.")
    return Response(state.metrics_text(), content_type=state.metrics.content_type)
