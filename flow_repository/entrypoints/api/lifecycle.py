"""Routes that start and stop flows, one at a time or several at once."""

from __future__ import annotations

from flask import Response
from flask_smorest import Blueprint

from flow_repository.contract.schemas import StatusResponseSchema

from . import (
    caller,
    command_results,
    envelope,
    error_responses,
    json_body,
    json_list,
    service,
    settings,
)

blp = Blueprint("lifecycle", __name__, description="Starting and stopping flows")

IDS_BODY = {"content": {"application/json": {"schema": {
    "type": "array", "items": {"type": "string"}}}}}
ERRORS = error_responses(400, 401, 403, 404, 409, 503)
MANY = {200: {"description": "A bare array aligned with the ids, as OIH answers: each item "
                             "`{data: {id, status}, meta: {}}` or "
                             "`{errors: [{message, flowId, code}]}`",
              "content": {"application/json": {"schema": {"type": "array", "items": {"oneOf": [
                  {"$ref": "#/components/schemas/StatusResponse"},
                  {"type": "object", "properties": {"errors": {"type": "array", "items": {
                      "type": "object", "properties": {
                          "message": {"type": "string"}, "flowId": {},
                          "code": {"type": "integer"}}}}}}]}}}}},
        **ERRORS, **error_responses(
            415, description="The body is not declared application/json")}


@blp.route("/flows/<flow_id>/start", methods=["POST"])
@blp.response(200, StatusResponseSchema)
@blp.doc(responses=ERRORS)
def start_flow(flow_id: str) -> Response:
    """Ask the orchestrator to start an inactive flow (status becomes starting)."""
    principal = caller(settings().flow_control_permission)
    return envelope(service().start(principal, flow_id), meta={})


@blp.route("/flows/<flow_id>/stop", methods=["POST"])
@blp.response(200, StatusResponseSchema)
@blp.doc(responses=ERRORS)
def stop_flow(flow_id: str) -> Response:
    """Ask the orchestrator to stop an active or starting flow (status becomes stopping)."""
    principal = caller(settings().flow_control_permission)
    return envelope(service().stop(principal, flow_id), meta={})


@blp.route("/flows/multiple/start", methods=["POST"])
@blp.doc(requestBody=IDS_BODY, responses=MANY)
def start_flows() -> Response:
    """Start several flows; the body is a JSON array of flow ids."""
    principal = caller(settings().flow_control_permission)
    ids = json_list(json_body(), "flow ids")
    return command_results(service().start_many(principal, ids), ids)


@blp.route("/flows/multiple/stop", methods=["POST"])
@blp.doc(requestBody=IDS_BODY, responses=MANY)
def stop_flows() -> Response:
    """Stop several flows; the body is a JSON array of flow ids."""
    principal = caller(settings().flow_control_permission)
    ids = json_list(json_body(), "flow ids")
    return command_results(service().stop_many(principal, ids), ids)
