"""Thin HTTP entry points: request parsing, the caller's identity and response envelopes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Response, current_app, jsonify, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from flow_repository.adapters.auth import Principal, bearer_token
from flow_repository.contract import error_body, json_text
from flow_repository.contract.schemas import ErrorResponseSchema
from flow_repository.domain.flow import Forbidden, InvalidFlow
from flow_repository.server.bootstrap import Runtime
from flow_repository.services import DryRun, FlowService, ItemResult, Page, Saved, Shown
from flow_repository.settings import Settings

MISSING_PERMISSION = "MISSING_PERMISSION"


def error_responses(*codes: int, description: str = "Error") -> dict[int, dict]:
    """The OpenAPI answers ``codes``, each in the service's error shape."""
    return {code: {"description": description, "content": {"application/json": {
        "schema": ErrorResponseSchema}}} for code in codes}


def runtime() -> Runtime:
    """The Runtime of the app serving the current request."""
    return current_app.extensions["flow_repository"]


def settings() -> Settings:
    return runtime().settings


def service() -> FlowService:
    return runtime().service


def caller(*permissions: str) -> Principal:
    """Authenticate the request and require every named permission (admins hold all)."""
    token = bearer_token(request.headers.get("Authorization"))
    principal = current_app.extensions["authenticator"].authenticate(token)
    require(principal, *permissions)
    return principal


def caller_token() -> str:
    """The caller's bearer token, passed on to services that check references with it."""
    return bearer_token(request.headers.get("Authorization"))


def dry_run_requested() -> bool:
    """True for ``?dryRun=true`` (or 1); 400 for a value that is not a boolean."""
    raw = request.args.get("dryRun")
    if raw is None or raw.lower() in ("false", "0"):
        return False
    if raw.lower() in ("true", "1", ""):
        return True
    raise InvalidFlow(f"dryRun: must be true or false (got {raw[:40]!r})")


def dry_run_answer(result: DryRun) -> Response:
    """200 with the flow as it would be stored, the problems and the warnings found."""
    return envelope(result.flow, meta=result.meta())


def authenticate_first(permission_setting: str) -> Callable[[Callable], Callable]:
    """Check identity before flask-smorest parses query arguments, so 401/403 precede 400.

    The principal is passed to the view as its first argument.
    """

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def authenticated(*args: Any, **kwargs: Any) -> Any:
            principal = caller(getattr(settings(), permission_setting))
            return view(principal, *args, **kwargs)

        return authenticated

    return decorate


def require(principal: Principal, *permissions: str) -> None:
    """403 MISSING_PERMISSION unless ``principal`` holds every named permission."""
    if not all(principal.can(permission) for permission in permissions):
        raise Forbidden(MISSING_PERMISSION)


def is_json_media_type(mimetype: str) -> bool:
    """application/json or any ``+json`` type (application/vnd.api+json, ...)."""
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json"))


def json_body() -> Any:
    """The parsed JSON body; 400 when absent or malformed, 415 when not declared JSON."""
    data = request.get_data(cache=True)
    if not data:
        raise InvalidFlow("the request body must be JSON")
    if not is_json_media_type(request.mimetype):
        raise UnsupportedMediaType(
            f"the request body must be sent as application/json (got Content-Type "
            f"{request.headers.get('Content-Type', 'none')!r})")
    limit = request.max_content_length
    # werkzeug silently stops a streamed (chunked) body at the limit: look for more.
    if (request.content_length is None and limit is not None and len(data) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    try:
        return request.get_json(force=True)
    except BadRequest:
        raise InvalidFlow("the request body is not valid JSON") from None


def json_list(body: Any, what: str) -> Sequence[Any]:
    if not isinstance(body, list):
        raise InvalidFlow(f"the body must be a JSON array of {what}")
    return body


def envelope(data: Any, status: int = 200, meta: Mapping[str, Any] | None = None,
             headers: Mapping[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"data": data}
    if meta is not None:
        body["meta"] = meta
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def encoded_answer(data: str, meta: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> Response:
    """``{data, meta}`` from the JSON text of its ``data``, encoded as :func:`envelope`
    encodes (keys sorted)."""
    return Response(f'{{"data":{data},"meta":{json_text(meta)}}}\n', headers=headers,
                    mimetype="application/json")


def page_answer(page: Page) -> Response:
    """A page of a list, written from the items' JSON texts the page was measured by."""
    return encoded_answer(f'[{",".join(page.encoded)}]', page.meta)


def shown_answer(shown: Shown) -> Response:
    """One flow as read, its revision the ETag."""
    return encoded_answer(shown.encoded, {}, {"ETag": f'"{shown.revision}"'})


def flow_answer(saved: Saved, status: int = 200) -> Response:
    """One flow as OIH answers it, ``{data, meta: {}}``, naming any dropped fields in meta."""
    meta = {"ignoredFields": list(saved.ignored_fields)} if saved.ignored_fields else {}
    return envelope(saved.flow, status, meta, headers=etag(saved.flow))


def aligned_results(results: Sequence[ItemResult], status: int) -> Response:
    """Bulk create/update: ``data[i]`` is the flow written for item i, or ``{errors}``."""
    data: list[Any] = []
    ignored: list[str] = []
    for result in results:
        if result.ok:
            data.append(result.data)
            ignored += [f"[{result.index}].{path}" for path in result.ignored_fields]
        else:
            data.append(error_body(result.status, *result.errors))
    succeeded = sum(1 for result in results if result.ok)
    meta: dict[str, Any] = {"total": len(results), "succeeded": succeeded,
                            "failed": len(results) - succeeded}
    if ignored:
        meta["ignoredFields"] = ignored
    return envelope(data, status, meta)


def command_results(results: Sequence[ItemResult], flow_ids: Sequence[Any]) -> Response:
    """Several starts or stops, as OIH answers them: a bare array aligned with the ids."""
    body = []
    for result in results:
        if result.ok:
            body.append({"data": result.data, "meta": {}})
        else:
            body.append({"errors": [{"message": message, "flowId": flow_ids[result.index],
                                     "code": result.status} for message in result.errors]})
    return jsonify(body)


def etag(flow: Mapping[str, Any]) -> dict[str, str]:
    return {"ETag": f'"{flow["revision"]}"'}
