"""Marshmallow schemas for flow bodies, query arguments and responses, and the checks behind them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from croniter import croniter
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from flow_repository.contract import READ_ONLY_FIELDS, SORT_FIELDS
from flow_repository.domain import paging
from flow_repository.domain.flow import (
    ACTIVE,
    INACTIVE,
    INT64_MAX,
    MAX_NODE_ID_LENGTH,
    STATUSES,
    InvalidFlow,
    ListQuery,
    Problem,
    describe,
    graph_problems,
    is_object_id,
    parse_number,
)

SEARCH_MAX_LENGTH = 200
JSON_MAX_DEPTH = 32
INT64 = (-(2**63), 2**63 - 1)
STATUS_CODES = {"1": ACTIVE, "0": INACTIVE}  # OIH's filter[status] values


def json_problems(value: Any, depth: int = 0) -> list[str]:
    """What MongoDB could not store faithfully in a free-form JSON value."""
    if depth > JSON_MAX_DEPTH:
        return [f"nested deeper than {JSON_MAX_DEPTH} levels"]
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return []
    if isinstance(value, int):
        low, high = INT64
        return [] if low <= value <= high else [f"integer {describe(value)} exceeds 64 bits"]
    items = value.values() if isinstance(value, Mapping) else value
    for item in items:
        found = json_problems(item, depth + 1)
        if found:
            return found
    return []


class ObjectIdString(fields.String):
    """A 24-hex-digit MongoDB ObjectId written as a string."""

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid_object_id": "is not a valid ObjectId"
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_object_id(text):
            raise self.make_error("invalid_object_id")
        return text


class StrictInteger(fields.Field):
    """A number from a query string: ASCII digits only, parsed by domain.parse_number."""

    def __init__(self, *, minimum: int = 0, maximum: int | None = INT64_MAX,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum, self.maximum = minimum, maximum
        # The OpenAPI document shows an integer with its range.
        self.metadata = {**self.metadata, "type": "integer", "minimum": minimum,
                         **({"maximum": maximum} if maximum is not None else {})}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        try:
            return parse_number(value, "", self.minimum, self.maximum)
        except InvalidFlow as error:
            raise ValidationError(error.message.removeprefix(": ")) from None

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        return value


class CronString(fields.String):
    """A cron expression (five fields, or six with seconds)."""

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid_cron": "is not a valid cron expression"
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > 100 or not croniter.is_valid(text):
            raise self.make_error("invalid_cron")
        return text


class JsonObject(fields.Dict):
    """A free-form JSON object (settings, fields) that MongoDB can store as given."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        result = super()._deserialize(value, attr, data, **kwargs)
        found = json_problems(result)
        if found:
            raise ValidationError(found)
        return result


class JsonValue(fields.Raw):
    """Any JSON value MongoDB can store as given (a mapper may be an object or a string)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        found = json_problems(value)
        if found:
            raise ValidationError(found)
        return value


def _text(maximum: int, **kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(max=maximum), **kwargs)


class NodeSchema(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True, validate=validate.Length(1, MAX_NODE_ID_LENGTH))
    componentId = ObjectIdString(required=True)
    function = fields.String(required=True, validate=validate.Length(1, 200))
    name = _text(200, allow_none=True)
    description = _text(2000, allow_none=True)
    credentials_id = ObjectIdString(allow_none=True)
    nodeSettings = JsonObject(keys=fields.String())
    fields = JsonObject(keys=fields.String())  # OIH's name; shadows the module below here


class EdgeConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    condition = _text(5000, allow_none=True)
    mapper = JsonValue(allow_none=True)


class EdgeSchema(Schema):
    class Meta:
        unknown = RAISE

    id = _text(100, allow_none=True)
    config = fields.Nested(EdgeConfigSchema, allow_none=True)
    source = fields.String(required=True, validate=validate.Length(min=1))
    target = fields.String(required=True, validate=validate.Length(min=1))


class GraphSchema(Schema):
    class Meta:
        unknown = RAISE

    nodes = fields.List(fields.Nested(NodeSchema), required=True)
    edges = fields.List(fields.Nested(EdgeSchema))


class OwnerSchema(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True, validate=validate.Length(1, 200))
    type = fields.String(required=True, validate=validate.Length(1, 50))


class FlowInputSchema(Schema):
    """A flow as a client writes it (POST, or the merged result of a PATCH)."""

    class Meta:
        unknown = RAISE

    name = _text(200, allow_none=True)
    description = _text(2000, allow_none=True)
    type = _text(50, allow_none=True)
    graph = fields.Nested(GraphSchema, required=True)
    owners = fields.List(fields.Nested(OwnerSchema))
    cron = CronString(allow_none=True)
    fromTemplate = ObjectIdString(allow_none=True)
    flowSettings = JsonObject(keys=fields.String(), allow_none=True)


class FlowOutputSchema(FlowInputSchema):
    """A flow as the service returns it (documentation of the response body)."""

    id = fields.String()
    tenant = fields.String(allow_none=True)
    status = fields.String(validate=validate.OneOf(STATUSES))
    createdAt = fields.String()
    updatedAt = fields.String()
    revision = fields.Integer()
    statusChangedAt = fields.String()
    statusReason = fields.String()


class FlowMetaSchema(Schema):
    ignoredFields = fields.List(fields.String(), metadata={
        "description": "paths of unknown fields that were dropped from the request"})


class FlowResponseSchema(Schema):
    data = fields.Nested(FlowOutputSchema)
    meta = fields.Nested(FlowMetaSchema)


class ListMetaSchema(Schema):
    total = fields.Integer()
    page = fields.Integer()
    perPage = fields.Integer(metadata={"description": "the page size used (after clamping)"})
    totalPages = fields.Integer()
    truncated = fields.Boolean(metadata={"description": "present when MAX_LIST_BYTES cut the "
                                         "page short: page on with perPage"})


class FlowListResponseSchema(Schema):
    data = fields.List(fields.Nested(FlowOutputSchema))
    meta = fields.Nested(ListMetaSchema)


class FlowStatusSchema(Schema):
    id = fields.String()
    status = fields.String(validate=validate.OneOf(STATUSES))


class StatusResponseSchema(Schema):
    data = fields.Nested(FlowStatusSchema)
    meta = fields.Dict()


class BulkMetaSchema(Schema):
    total = fields.Integer()
    succeeded = fields.Integer()
    failed = fields.Integer()
    ignoredFields = fields.List(fields.String(), metadata={
        "description": "dropped unknown fields, each prefixed by its item's index"})


class BulkResponseSchema(Schema):
    data = fields.List(fields.Dict(), metadata={
        "description": "aligned with the input: the flow written, or {errors: [...]}"})
    meta = fields.Nested(BulkMetaSchema)


class DeletedResponseSchema(Schema):
    msg = fields.String(metadata={"example": "Flow was successfully deleted"})


class ErrorItemSchema(Schema):
    message = fields.String()
    code = fields.Integer()


class ErrorResponseSchema(Schema):
    errors = fields.List(fields.Nested(ErrorItemSchema))


class PageArgumentsSchema(Schema):
    """Paging in OIH's bracketed JSON:API-style names (flows, and a flow's revisions)."""

    class Meta:
        unknown = EXCLUDE

    # No upper bound here: sizes above the configured maximum are clamped, not refused.
    page_size = StrictInteger(data_key="page[size]", load_default=10, minimum=1, maximum=None)
    page_number = StrictInteger(data_key="page[number]", load_default=1, minimum=1,
                                maximum=1_000_000)


class ListArgumentsSchema(PageArgumentsSchema):
    """GET /flows query arguments, in OIH's bracketed JSON:API-style names."""

    status = fields.String(data_key="filter[status]",
                           validate=validate.OneOf([*STATUSES, *STATUS_CODES]))
    type = _text(50, data_key="filter[type]")
    user = _text(200, data_key="filter[user]")
    from_template = ObjectIdString(data_key="filter[fromTemplate]")
    sort = fields.String(validate=validate.OneOf(
        [*SORT_FIELDS, *(f"-{name}" for name in SORT_FIELDS)]))
    search = _text(SEARCH_MAX_LENGTH)


class WatchArgumentsSchema(Schema):
    """GET /flows/events query arguments: the filters of GET /flows, a position, include."""

    class Meta:
        unknown = EXCLUDE

    status = fields.String(data_key="filter[status]",
                           validate=validate.OneOf([*STATUSES, *STATUS_CODES]))
    type = _text(50, data_key="filter[type]")
    user = _text(200, data_key="filter[user]")
    from_template = ObjectIdString(data_key="filter[fromTemplate]")
    since = fields.String(metadata={"description": "resume after this event id (as the "
                                                   "Last-Event-ID header, which wins)"})
    include = fields.String(validate=validate.OneOf(["flow"]), metadata={
        "description": "`flow`: each event carries the flow as it is now (null once it is "
                       "gone or no longer visible)"})


WATCH_FILTERS = frozenset({"filter[status]", "filter[type]", "filter[user]",
                           "filter[fromTemplate]"})


def watch_query(arguments: Mapping[str, Any]) -> ListQuery:
    """The filters of a watch, as the query object of GET /flows (paging unused)."""
    status = arguments.get("status")
    return ListQuery(status=STATUS_CODES.get(status, status), type=arguments.get("type"),
                     user=arguments.get("user"), from_template=arguments.get("from_template"))


class DiffArgumentsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    source = StrictInteger(data_key="from", required=True, minimum=1)
    target = StrictInteger(data_key="to", minimum=1)


class RestoreInputSchema(Schema):
    revision = fields.Integer(required=True, validate=validate.Range(min=1))


class StatusChangeSchema(Schema):
    source = fields.String(data_key="from")
    to = fields.String()
    reason = fields.String()


class HistoryEntrySchema(Schema):
    """One revision of a flow: who changed what, when; definition changes hold the flow."""

    revision = fields.Integer()
    kind = fields.String(validate=validate.OneOf(("definition", "status", "owners")))
    change = fields.String()
    sub = fields.String(allow_none=True)
    at = fields.String()
    restoredFrom = fields.Integer()
    traceId = fields.String(metadata={
        "description": "W3C trace id of the request or report that made the change, when "
                       "it came in a trace (a traceparent header)"})
    status = fields.Nested(StatusChangeSchema)
    flow = fields.Nested(FlowOutputSchema)


class HistoryEntryResponseSchema(Schema):
    data = fields.Nested(HistoryEntrySchema)


class HistoryListResponseSchema(Schema):
    data = fields.List(fields.Nested(HistoryEntrySchema))
    meta = fields.Nested(ListMetaSchema)


class JsonPatchOperationSchema(Schema):
    op = fields.String(validate=validate.OneOf(
        ("add", "remove", "replace", "move", "copy", "test")))
    path = fields.String()
    value = fields.Raw()
    from_ = fields.String(data_key="from")


class DiffSchema(Schema):
    source = fields.Integer(data_key="from")
    to = fields.Integer()
    patch = fields.List(fields.Nested(JsonPatchOperationSchema))


class DiffResponseSchema(Schema):
    data = fields.Nested(DiffSchema)


class DryRunMetaSchema(Schema):
    dryRun = fields.Boolean()
    valid = fields.Boolean()
    problems = fields.List(fields.Nested(ErrorItemSchema))
    warnings = fields.List(fields.String())
    ignoredFields = fields.List(fields.String())


class DryRunResponseSchema(Schema):
    data = fields.Nested(FlowOutputSchema, allow_none=True)
    meta = fields.Nested(DryRunMetaSchema)


def list_query(arguments: Mapping[str, Any], max_page_size: int) -> ListQuery:
    """Turn loaded list arguments into the store's query object.

    A page size above ``max_page_size`` is clamped to it (OIH has no bound and its clients
    ask for 1000); ``filter[status]`` takes OIH's ``1`` and ``0`` besides the names.
    """
    sort = arguments.get("sort") or "createdAt"
    status = arguments.get("status")
    return ListQuery(
        page_size=paging.clamp_page_size(arguments["page_size"], max_page_size),
        page_number=arguments["page_number"],
        status=STATUS_CODES.get(status, status),
        type=arguments.get("type"),
        user=arguments.get("user"),
        from_template=arguments.get("from_template"),
        search=arguments.get("search") or None,
        sort_field=sort.lstrip("-"),
        sort_descending=sort.startswith("-"),
    )


# ----------------------------------------------------------------------------- problems


def _value_at(data: Any, path: list[Any]) -> tuple[bool, Any]:
    for step in path:
        if isinstance(data, Mapping) and step in data or isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data):
            data = data[step]
        else:
            return False, None
    return True, data


def _path_text(path: list[Any]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def problems_from(messages: Any, data: Any, path: list[Any] | None = None) -> list[Problem]:
    """Flatten marshmallow's nested messages into problems naming field and offending value."""
    path = path or []
    if isinstance(messages, Mapping):
        found: list[Problem] = []
        for key, inner in messages.items():
            step = key if isinstance(key, int) or key != "_schema" else None
            found += problems_from(inner, data, path + ([step] if step is not None else []))
        return found
    texts = messages if isinstance(messages, list) else [messages]
    present, value = _value_at(data, path)
    problems = []
    for text in texts:
        if isinstance(text, (Mapping, list)):
            problems += problems_from(text, data, path)
            continue
        text = str(text).rstrip(".")
        if present and text != "Unknown field":
            text = f"{text} (got {describe(value)})"
        problems.append(Problem(_path_text(path), text))
    return problems


def _load_fields(schema: Schema) -> dict[str, fields.Field]:
    return {field.data_key or name: field for name, field in schema.load_fields.items()}


def drop_unknown(schema: Schema, data: Any, path: list[Any] | None = None,
                 ignore: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """``data`` without the fields ``schema`` does not know, at any depth of its structure.

    Nested schemas and lists of them are followed; free-form values (``fields``,
    ``nodeSettings``, ``flowSettings``, an edge's ``mapper``) are kept whole. Values of
    the wrong type are left alone for validation to report. Returns the kept data and the
    path of every dropped field; keys in ``ignore`` are dropped without being reported.
    """
    path = path or []
    if not isinstance(data, Mapping):
        return data, []
    known = _load_fields(schema)
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in data.items():
        field = known.get(key)
        if field is None:
            if key not in ignore:
                dropped.append(_path_text([*path, key]))
            continue
        inner = field.inner if isinstance(field, fields.List) else None
        if isinstance(field, fields.Nested):
            value, found = drop_unknown(field.schema, value, [*path, key])
            dropped += found
        elif isinstance(inner, fields.Nested) and isinstance(value, list):
            items = []
            for index, item in enumerate(value):
                item, found = drop_unknown(inner.schema, item, [*path, key, index])
                items.append(item)
                dropped += found
            value = items
        kept[key] = value
    return kept, dropped


# One instance, built once: building a schema (and its nested ones) costs more than
# loading a flow with it. load() keeps no state on the instance, so requests can share it.
FLOW_INPUT = FlowInputSchema()


def validate_flow(
    body: Any, *, partial: bool = False, status: str | None = INACTIVE
) -> tuple[dict[str, Any], list[str]]:
    """Check a flow body against every rule at once; return its clean fields and the
    paths of the unknown fields that were dropped from it.

    With ``partial`` only the fields present are checked (a PATCH body before merging);
    the graph rules run whenever a graph is present. A ``status`` equal to ``status`` (the
    flow's current status; a new flow is inactive) is ignored, any other is refused; with
    ``status=None`` the caller checks it later. Raises InvalidFlow listing every problem.
    """
    if not isinstance(body, Mapping):
        raise InvalidFlow(f"the body must be a JSON object (got {describe(body)})")
    problems: list[Problem] = []
    if status is not None and "status" in body and body["status"] != status:
        problems.append(Problem("status", f"must be the flow's current status, {status}: "
                                          f"use /flows/{{id}}/start or /stop to change it "
                                          f"(got {describe(body['status'])})"))
    candidate, dropped = drop_unknown(FLOW_INPUT, body, ignore=(*READ_ONLY_FIELDS, "status"))
    try:
        clean = FLOW_INPUT.load(candidate, partial=partial)
    except ValidationError as error:
        problems += problems_from(error.messages, candidate)
        clean = None
    graph = clean.get("graph") if clean is not None else candidate.get("graph")
    if isinstance(graph, Mapping):
        reported = {problem.path for problem in problems}
        problems += [p for p in graph_problems(graph) if p.path not in reported]
    if problems:
        raise InvalidFlow("the flow is not valid", problems)
    return clean, dropped
