"""Routes for flows: list, create (one or many), read, update (one or many) and delete."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request
from flask_smorest import Blueprint

from flow_repository.adapters.auth import Principal
from flow_repository.contract.schemas import (
    BulkResponseSchema,
    DeletedResponseSchema,
    DryRunResponseSchema,
    FlowInputSchema,
    FlowListResponseSchema,
    FlowResponseSchema,
    ListArgumentsSchema,
    list_query,
)
from flow_repository.domain.flow import InvalidFlow
from flow_repository.services import parse_if_match

from . import (
    aligned_results,
    authenticate_first,
    caller,
    caller_token,
    dry_run_answer,
    dry_run_requested,
    error_responses,
    flow_answer,
    json_body,
    json_list,
    page_answer,
    require,
    service,
    settings,
    shown_answer,
)

blp = Blueprint("flows", __name__, description="Integration flows")

ERRORS = (400, 401, 403, 404, 409, 412, 413, 415, 503)
FLOW_BODY = {"content": {"application/json": {"schema": FlowInputSchema}}}
IF_MATCH = {"in": "header", "name": "If-Match", "schema": {"type": "string"}}
DRY_RUN = {"in": "query", "name": "dryRun", "schema": {"type": "boolean"},
           "description": "check everything, write nothing: 200 with the flow as it would be "
                          "stored and the problems found"}
DRY_RUN_ANSWER = {"description": "Dry run: the flow as it would be stored, and the problems",
                  "content": {"application/json": {"schema": DryRunResponseSchema}}}
FLOW_OR_LIST_BODY = {"content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/FlowInput"},
    {"type": "array", "items": {"$ref": "#/components/schemas/FlowInput"}},
]}}}}


@blp.route("/flows", methods=["GET"])
@authenticate_first("flow_read_permission")
@blp.arguments(ListArgumentsSchema(), location="query", error_status_code=400)
@blp.response(200, FlowListResponseSchema)
@blp.doc(responses=error_responses(400, 401, 403, 503))
def list_flows(principal: Principal, arguments: dict[str, Any]) -> Response:
    """List the flows the caller may see, a page at a time."""
    return page_answer(service().list(principal, list_query(arguments,
                                                            settings().max_page_size)))


@blp.route("/flows", methods=["POST"])
@blp.doc(requestBody=FLOW_OR_LIST_BODY, parameters=[DRY_RUN], responses={
    200: DRY_RUN_ANSWER,
    201: {"description": "Created. An array body gets `data` aligned with it: each item the "
                          "created flow or `{errors}`", "content": {"application/json": {
                              "schema": {"oneOf": [{"$ref": "#/components/schemas/FlowResponse"},
                                                   {"$ref": "#/components/schemas/BulkResponse"}]}}}},
    **error_responses(400, 401, 403, 413, 415, 503)})
def create_flow() -> Response:
    """Create a flow, or several from a JSON array (needs the bulk permission too)."""
    names = settings()
    principal = caller(names.flow_write_permission)  # before the body: 401/403 come first
    body = json_body()
    if dry_run_requested():
        if isinstance(body, list):
            raise InvalidFlow("a dry run checks one flow at a time, not a JSON array")
        return dry_run_answer(service().create_dry_run(principal, body, token=caller_token()))
    if isinstance(body, list):
        require(principal, names.flow_bulk_permission)
        return aligned_results(service().create_many(principal, body, token=caller_token()),
                               201)
    return flow_answer(service().create(principal, body, token=caller_token()), 201)


@blp.route("/flows/validate", methods=["POST"])
@blp.doc(requestBody=FLOW_BODY, responses={200: DRY_RUN_ANSWER,
                                           **error_responses(400, 401, 403, 413, 503)})
def validate_flow() -> Response:
    """Check a new flow as POST /flows would, and store nothing (POST /flows?dryRun=true)."""
    principal = caller(settings().flow_write_permission)
    return dry_run_answer(service().create_dry_run(principal, json_body(),
                                                   token=caller_token()))


@blp.route("/flows/bulk", methods=["PATCH"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {
    "type": "array", "items": {"$ref": "#/components/schemas/FlowInput"}}}}},
    responses={200: {"description": "`data` aligned with the input: each item the updated "
                                     "flow or `{errors}`", "content": {"application/json": {
                                         "schema": BulkResponseSchema}}},
               **error_responses(400, 401, 403, 413, 415, 503)})
def update_flows() -> Response:
    """Update several flows; each item carries its ``id``. Results are per item."""
    names = settings()
    principal = caller(names.flow_write_permission, names.flow_bulk_permission)
    items = json_list(json_body(), "flows with ids")
    return aligned_results(service().update_many(principal, items, token=caller_token()), 200)


@blp.route("/flows/<flow_id>", methods=["GET"])
@blp.response(200, FlowResponseSchema)
@blp.doc(responses=error_responses(400, 401, 403, 404, 503))
def get_flow(flow_id: str) -> Response:
    """One flow; its revision is returned as the ETag."""
    return shown_answer(service().get(caller(settings().flow_read_permission), flow_id))


@blp.route("/flows/<flow_id>", methods=["PATCH"])
@blp.doc(requestBody=FLOW_BODY, responses={200: {"description": "Updated (or a dry run)",
    "content": {"application/json": {"schema": {"oneOf": [
        {"$ref": "#/components/schemas/FlowResponse"},
        {"$ref": "#/components/schemas/DryRunResponse"}]}}}}, **error_responses(*ERRORS)},
    parameters=[IF_MATCH, DRY_RUN])
def update_flow(flow_id: str) -> Response:
    """Change an inactive flow; honours If-Match. ``?dryRun=true`` checks and writes nothing."""
    principal = caller(settings().flow_write_permission)
    if_match = parse_if_match(request.headers.get("If-Match"))
    if dry_run_requested():
        return dry_run_answer(service().update_dry_run(principal, flow_id, json_body(),
                                                       if_match, token=caller_token()))
    return flow_answer(service().update(principal, flow_id, json_body(), if_match,
                                        token=caller_token()))


@blp.route("/flows/<flow_id>", methods=["DELETE"])
@blp.doc(responses={200: {"description": "Deleted", "content": {"application/json": {
    "schema": DeletedResponseSchema}}}, **error_responses(*ERRORS)},
         parameters=[IF_MATCH])
def delete_flow(flow_id: str) -> Response:
    """Delete an inactive flow; honours If-Match."""
    principal = caller(settings().flow_write_permission)
    if_match = parse_if_match(request.headers.get("If-Match"))
    service().delete(principal, flow_id, if_match)
    return jsonify({"msg": "Flow was successfully deleted"})  # OIH's answer, word for word


@blp.route("/flows/<flow_id>/steps/<step_id>/logs", methods=["GET"])
@blp.doc(
    summary="The logs of one step, from OIH's logging service",
    parameters=[{"in": "query", "name": "params", "required": False, "style": "form",
                 "explode": True, "schema": {"type": "object", "additionalProperties": True},
                 "description": "any query string is passed on to the logging service"}],
    responses={200: {"description": "The logging service's answer, passed on as it streams",
                     "content": {"application/json": {"schema": {}}}},
               **error_responses(400, 401, 404, 501, 502, 503, 504)})
def step_logs(flow_id: str, step_id: str) -> Response:
    """Proxy to LOGGING_SERVICE_BASE_URL/logs/flows/{id}/steps/{stepId} for a visible flow.

    Status and body of the logging service are passed on, except that a refusal of the
    service's own token (401/403) is 502. Unreachable: 502; slower than
    LOGGING_SERVICE_TIMEOUT_SECONDS: 504; no logging service configured: 501.
    """
    principal = caller()
    query = request.query_string.decode("latin-1")
    answer = service().step_logs(principal, flow_id, step_id, query)
    return Response(answer.chunks, status=answer.status, content_type=answer.content_type)
