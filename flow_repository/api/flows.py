"""Routes for flows: list, create (one or many), read, update (one or many) and delete."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask_smorest import Blueprint

from ..auth import Principal
from ..schemas import (
    ErrorResponseSchema,
    FlowInputSchema,
    FlowListResponseSchema,
    FlowResponseSchema,
    ItemResultsResponseSchema,
    ListArgumentsSchema,
    list_query,
)
from ..services import parse_if_match
from . import (
    authenticate_first,
    caller,
    envelope,
    etag,
    item_results,
    json_body,
    json_list,
    require,
    service,
    settings,
)

blp = Blueprint("flows", __name__, description="Integration flows")

ERRORS = (400, 401, 403, 404, 409, 412, 413, 503)
FLOW_BODY = {"content": {"application/json": {"schema": FlowInputSchema}}}
FLOW_OR_LIST_BODY = {"content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/FlowInput"},
    {"type": "array", "items": {"$ref": "#/components/schemas/FlowInput"}},
]}}}}


def _errors(*codes: int) -> dict:
    return {code: {"description": "Error", "content": {"application/json": {
        "schema": ErrorResponseSchema}}} for code in codes}


@blp.route("/flows", methods=["GET"])
@authenticate_first("flow_read_permission")
@blp.arguments(ListArgumentsSchema, location="query", error_status_code=400)
@blp.response(200, FlowListResponseSchema)
@blp.doc(responses=_errors(400, 401, 403, 503))
def list_flows(principal: Principal, arguments: dict[str, Any]) -> Response:
    """List the flows the caller may see, a page at a time."""
    flows, meta = service().list(principal, list_query(arguments))
    return envelope(flows, meta=meta)


@blp.route("/flows", methods=["POST"])
@blp.doc(requestBody=FLOW_OR_LIST_BODY, responses={
    201: {"description": "Created", "content": {"application/json": {
        "schema": FlowResponseSchema}}},
    207: {"description": "Array body: some items failed", "content": {"application/json": {
        "schema": ItemResultsResponseSchema}}},
    **_errors(400, 401, 403, 413, 503)})
def create_flow() -> Response:
    """Create a flow, or several from a JSON array (needs the bulk permission too)."""
    names = settings()
    principal = caller(names.flow_write_permission)  # before the body: 401/403 come first
    body = json_body()
    if isinstance(body, list):
        require(principal, names.flow_bulk_permission)
        return item_results(service().create_many(principal, body), 201)
    flow = service().create(principal, body)
    return envelope(flow, 201, headers=etag(flow))


@blp.route("/flows/bulk", methods=["PATCH"])
@blp.doc(requestBody={"content": {"application/json": {"schema": {
    "type": "array", "items": {"$ref": "#/components/schemas/FlowInput"}}}}},
    responses={200: {"description": "Every item updated", "content": {"application/json": {
        "schema": ItemResultsResponseSchema}}},
        207: {"description": "Some items failed"}, **_errors(400, 401, 403, 413, 503)})
def update_flows() -> Response:
    """Update several flows; each item carries its ``id``. Results are per item."""
    names = settings()
    principal = caller(names.flow_write_permission, names.flow_bulk_permission)
    items = json_list(json_body(), "flows with ids")
    return item_results(service().update_many(principal, items), 200)


@blp.route("/flows/<flow_id>", methods=["GET"])
@blp.response(200, FlowResponseSchema)
@blp.doc(responses=_errors(400, 401, 403, 404, 503))
def get_flow(flow_id: str) -> Response:
    """One flow; its revision is returned as the ETag."""
    principal = caller(settings().flow_read_permission)
    flow = service().get(principal, flow_id)
    return envelope(flow, headers=etag(flow))


@blp.route("/flows/<flow_id>", methods=["PATCH"])
@blp.doc(requestBody=FLOW_BODY, responses={200: {"description": "Updated", "content": {
    "application/json": {"schema": FlowResponseSchema}}}, **_errors(*ERRORS)},
    parameters=[{"in": "header", "name": "If-Match", "schema": {"type": "string"}}])
def update_flow(flow_id: str) -> Response:
    """Change an inactive flow; honours If-Match."""
    principal = caller(settings().flow_write_permission)
    if_match = parse_if_match(request.headers.get("If-Match"))
    flow = service().update(principal, flow_id, json_body(), if_match)
    return envelope(flow, headers=etag(flow))


@blp.route("/flows/<flow_id>", methods=["DELETE"])
@blp.doc(responses={200: {"description": "Deleted"}, **_errors(*ERRORS)},
         parameters=[{"in": "header", "name": "If-Match", "schema": {"type": "string"}}])
def delete_flow(flow_id: str) -> Response:
    """Delete an inactive flow; honours If-Match."""
    principal = caller(settings().flow_write_permission)
    if_match = parse_if_match(request.headers.get("If-Match"))
    service().delete(principal, flow_id, if_match)
    return envelope({"id": flow_id, "deleted": True})
