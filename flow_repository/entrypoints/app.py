"""create_app: the Flask + flask-smorest application, its JSON errors, CORS and request logging."""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request, send_from_directory
from flask.json.provider import DefaultJSONProvider
from flask_smorest import Api
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import HTTPException

from flow_repository.adapters.auth import (
    Authenticator,
    AuthError,
    IdentityUnavailable,
    build_authenticator,
)
from flow_repository.adapters.store import Store, StoreUnavailable
from flow_repository.adapters.tracing import Tracing
from flow_repository.contract import error_body
from flow_repository.contract.schemas import ErrorResponseSchema
from flow_repository.domain import trace
from flow_repository.domain.flow import FlowError
from flow_repository.entrypoints.consumer import StatusConsumer
from flow_repository.server.bootstrap import Runtime
from flow_repository.server.logs import REQUEST_ID, configure_logging
from flow_repository.settings import MEMORY_DATABASE, Settings

log = logging.getLogger(__name__)

API_TITLE = "Flow Repository"
API_VERSION = "1.0.0"
EXTENSION = "flow_repository"
# Swagger UI's scripts are served from the installed swagger-ui-bundle, so /api-docs works
# on installations without internet access.
SWAGGER_ASSETS = "/api-docs/assets"
# Probes and scrapes every few seconds: no span of their own (a traceparent still counts).
UNTRACED_ROUTES = frozenset({"/livez", "/readyz", "/healthcheck", "/metrics"})


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf, which JSON cannot write back
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """True when a parsed string holds a UTF-16 surrogate (BSON cannot encode it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class StrictJSONProvider(DefaultJSONProvider):
    """JSON that MongoDB and every client can take: no NaN/Infinity, bounded nesting."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        def refuse(constant: str) -> Any:
            raise ValueError(f"{constant} is not valid JSON")

        try:
            value = json.loads(s, parse_constant=refuse, parse_float=_finite, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        suspect = isinstance(s, str) or b"\\u" in s or b"\xed" in s
        if suspect and _has_lone_surrogate(value):
            raise ValueError("JSON string holds an unpaired surrogate")
        return value


class FlowApi(Api):
    """flask-smorest's Api documenting the service's own error shape for default responses."""

    ERROR_SCHEMA = ErrorResponseSchema


def error_response(status: int, messages: list[str], headers: dict | None = None) -> Response:
    """The one error shape of the service: ``{"errors": [{"message", "code"}]}``."""
    response = Response(json.dumps(error_body(status, *messages)), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    authenticator: Authenticator | None = None,
    background: bool = False,
    tracing: Tracing | None = None,
) -> Flask:
    """Build the service. ``background`` starts the relay (and, embedded, consumer/reconciler).
    ``tracing``: default, as the OTEL_* settings ask."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    if settings.embedded and settings.embedded_database == MEMORY_DATABASE:
        log.warning("MONGODB_URL is not set and EMBEDDED_DB_PATH is :memory:: the store is "
                    "in memory. DATA IS NOT KEPT and is lost when the process stops.")
    elif settings.embedded:
        log.info(f"MONGODB_URL is not set: the embedded SQLite store keeps the data in "
                 f"{settings.embedded_database}",
                 extra={"database": settings.embedded_database})
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE=API_TITLE,
        API_VERSION=API_VERSION,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/api-docs",
        OPENAPI_SWAGGER_UI_URL=f"{SWAGGER_ASSETS}/",
    )
    app.url_map.strict_slashes = False  # /flows/ is /flows, as Express treats it

    embedded = settings.embedded
    state = Runtime.build(
        settings,
        store=store,
        relay=background and (embedded or settings.run_relay_in_api),
        consumer=StatusConsumer if background and embedded else None,
        reconciler=background and embedded,
        # a file is shared with this process's sibling workers and with worker processes
        take_turns=embedded and settings.embedded_database != MEMORY_DATABASE,
        tracing=tracing,
    )
    app.extensions[EXTENSION] = state
    app.extensions["authenticator"] = authenticator or build_authenticator(settings)

    api = FlowApi(app, spec_kwargs={"components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"}}}, "security": [{"bearer": []}]})
    from flow_repository.entrypoints.api import events, flows, health, history, lifecycle

    for blueprint in (health.blp, flows.blp, events.blp, lifecycle.blp, history.blp):
        api.register_blueprint(blueprint)
    app.add_url_rule(f"{SWAGGER_ASSETS}/<path:filename>", "swagger_ui_assets",
                     lambda filename: send_from_directory(swagger_ui_path, filename))
    _install_error_handlers(app)
    _install_trace_hooks(app, state.tracing)
    _install_request_hooks(app, state)
    if background:
        state.start()
    return app


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(FlowError)
    def flow_error(error: FlowError) -> Response:
        return error_response(error.status, error.messages(), getattr(error, "headers", None))

    @app.errorhandler(AuthError)
    def auth_error(error: AuthError) -> Response:
        return error_response(401, [str(error)], {"WWW-Authenticate": "Bearer"})

    @app.errorhandler(IdentityUnavailable)
    def identity_unavailable(error: IdentityUnavailable) -> Response:
        log.warning("IAM unavailable", extra={"error": str(error)})
        return error_response(503, ["Identity service is unavailable; retry later."],
                              {"Retry-After": "5"})

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(error: StoreUnavailable) -> Response:
        log.warning("MongoDB unavailable", extra={"error": str(error)})
        return error_response(503, ["Database is unavailable; retry later."],
                              {"Retry-After": "5"})

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = _webargs_messages(error)
        if status == 422:  # webargs reports bad query arguments as 422; clients expect 400
            status = 400
        if not messages:
            if status == 413:
                limit = app.config["MAX_CONTENT_LENGTH"]
                messages = [f"Request body too large: the limit is {limit} bytes."]
            else:
                messages = [error.description or error.name]
        headers = {}
        if status == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(error.valid_methods)
        return error_response(status, messages, headers)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, ["Internal server error."])


def _webargs_messages(error: HTTPException) -> list[str]:
    from flow_repository.contract.schemas import problems_from

    data = getattr(error, "data", None)
    messages = data.get("messages") if isinstance(data, dict) else None
    if not messages:
        return []
    located = messages.get("query", messages) if isinstance(messages, dict) else messages
    return [problem.text() for problem in problems_from(located, dict(request.args))]


def _install_trace_hooks(app: Flask, tracing: Tracing) -> None:
    """Each request in the caller's trace: one carrying a valid ``traceparent`` continues it
    (a malformed one is ignored), and with tracing on each request is a span, named after
    its route once routing has found it.

    The trace context is current while the request is handled (the outbox events, history
    entries and log lines take it from there) and waits in the environ for the access log.
    Neither tracing nor a ``traceparent`` (or a probe without one): nothing is done.
    Registered first, so its hooks run first and its teardown last.
    """

    @app.before_request
    def begin_trace() -> None:
        environ = request.environ
        parent = None
        if "HTTP_TRACEPARENT" in environ:
            parent = trace.parse(environ["HTTP_TRACEPARENT"], environ.get("HTTP_TRACESTATE"))
        rule = request.url_rule
        route = rule.rule if rule is not None else None
        if parent is None and (not tracing.enabled or route in UNTRACED_ROUTES):
            return
        method = request.method
        attributes = None
        if tracing.enabled:
            attributes = {"http.request.method": method}
            if route is not None:
                attributes["http.route"] = route
        g.trace = tracing.begin(f"{method} {route}" if route else method, parent,
                                attributes=attributes)
        environ[trace.ENVIRON_KEY] = trace.current()

    @app.after_request
    def answer_trace(response: Response) -> Response:
        begun = g.get("trace")
        if begun is not None and begun[0] is not None:
            tracing.annotate(begun[0], attributes={
                "http.response.status_code": response.status_code},
                error=response.status_code >= 500)
        return response

    @app.teardown_request
    def end_trace(error: BaseException | None) -> None:
        begun = g.pop("trace", None)
        if begun is not None:
            tracing.finish(begun, error)


def _install_request_hooks(app: Flask, state: Runtime) -> None:
    whitelist = set(state.settings.origin_whitelist)

    @app.before_request
    def begin() -> Response | None:
        g.started = time.perf_counter()
        g.request_id = (request.headers.get("X-Request-Id") or "")[:64] or uuid.uuid4().hex
        g.token = REQUEST_ID.set(g.request_id)
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if origin not in whitelist:
                return error_response(403, [f"Origin {origin!r} is not allowed."])
            return Response(status=204)
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin in whitelist:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = "ETag, X-Request-Id"
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = (
                    "GET, POST, PATCH, DELETE, OPTIONS"
                )
                response.headers["Access-Control-Allow-Headers"] = (
                    "Authorization, Content-Type, If-Match, X-Request-Id"
                )
                response.headers["Access-Control-Max-Age"] = "600"
        request_id = getattr(g, "request_id", None)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        started = getattr(g, "started", None)
        if started is not None:
            seconds = time.perf_counter() - started
            route = request.url_rule.rule if request.url_rule else None
            state.metrics.request(request.method, route, response.status_code, seconds)
        return response

    @app.teardown_request
    def reset(_: BaseException | None) -> None:
        token = g.pop("token", None)
        if token is not None:
            REQUEST_ID.reset(token)
