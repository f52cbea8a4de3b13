"""Routes for a flow's history: its revisions, one revision, a diff, and restoring one."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from flask_smorest import Blueprint

from flow_repository.adapters.auth import Principal
from flow_repository.contract.schemas import (
    DiffArgumentsSchema,
    DiffResponseSchema,
    FlowResponseSchema,
    HistoryEntryResponseSchema,
    HistoryListResponseSchema,
    PageArgumentsSchema,
    RestoreInputSchema,
)
from flow_repository.domain.flow import InvalidFlow, describe, parse_number
from flow_repository.domain.paging import clamp_page_size
from flow_repository.services import parse_if_match

from . import (
    authenticate_first,
    caller,
    caller_token,
    envelope,
    error_responses,
    flow_answer,
    json_body,
    page_answer,
    service,
    settings,
)

blp = Blueprint("history", __name__, description="Revisions of a flow: list, read, diff, restore")


@blp.route("/flows/<flow_id>/revisions", methods=["GET"])
@authenticate_first("flow_read_permission")
@blp.arguments(PageArgumentsSchema, location="query", error_status_code=400)
@blp.response(200, HistoryListResponseSchema)
@blp.doc(responses=error_responses(400, 401, 403, 404, 503))
def list_revisions(principal: Principal, arguments: dict[str, Any], flow_id: str) -> Response:
    """A flow's history, newest revision first, a page at a time."""
    page_size = clamp_page_size(arguments["page_size"], settings().max_page_size)
    return page_answer(service().revisions(principal, flow_id, arguments["page_number"],
                                           page_size))


@blp.route("/flows/<flow_id>/revisions/<revision>", methods=["GET"])
@blp.response(200, HistoryEntryResponseSchema)
@blp.doc(responses=error_responses(400, 401, 403, 404, 503))
def get_revision(flow_id: str, revision: str) -> Response:
    """One revision: who changed what and when, and the flow as it stood then."""
    principal = caller(settings().flow_read_permission)
    number = parse_number(revision, "revision", minimum=1)
    return envelope(service().revision(principal, flow_id, number), meta={})


@blp.route("/flows/<flow_id>/diff", methods=["GET"])
@authenticate_first("flow_read_permission")
@blp.arguments(DiffArgumentsSchema, location="query", error_status_code=400)
@blp.response(200, DiffResponseSchema)
@blp.doc(responses=error_responses(400, 401, 403, 404, 503))
def diff_revisions(principal: Principal, arguments: dict[str, Any], flow_id: str) -> Response:
    """An RFC 6902 JSON Patch from revision ``from`` to ``to`` (default: the current one)."""
    return envelope(service().diff(principal, flow_id, arguments["source"],
                                   arguments.get("target")), meta={})


@blp.route("/flows/<flow_id>/restore", methods=["POST"])
@blp.doc(requestBody={"content": {"application/json": {"schema": RestoreInputSchema}}},
         parameters=[{"in": "header", "name": "If-Match", "schema": {"type": "string"}}],
         responses={200: {"description": "Restored as a new revision", "content": {
             "application/json": {"schema": FlowResponseSchema}}},
             **error_responses(400, 401, 403, 404, 409, 412, 413, 503)})
def restore_revision(flow_id: str) -> Response:
    """Make an earlier revision's definition current again, as a new revision."""
    principal = caller(settings().flow_write_permission)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = json_body()
    if not isinstance(body, dict) or set(body) != {"revision"}:
        raise InvalidFlow(f'the body must be {{"revision": <number>}} (got {describe(body)})')
    return flow_answer(service().restore(principal, flow_id, body["revision"], if_match,
                                         token=caller_token()))
