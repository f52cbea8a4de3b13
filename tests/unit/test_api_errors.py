"""Every REST error path answers JSON {"errors": [{message, code}]}: routing, body, auth, store."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from flask.testing import FlaskClient

from flow_repository.adapters.auth import mint_token
from flow_repository.adapters.store import FlowStore, decode_keys
from flow_repository.contract.schemas import JSON_MAX_DEPTH
from flow_repository.services import FlowService
from flow_repository.settings import Settings

Headers = Callable[..., dict[str, str]]
Create = Callable[..., dict[str, Any]]
STATUS_MESSAGE = ("status: must be the flow's current status, inactive: use "
                  "/flows/{id}/start or /stop to change it (got 'active')")
JWT_SECRET = "unit-test-jwt-secret-0123456789abcdef-0123456789abcdef"
UNSAFE = {"$where": "1", "a.b": {"~": [{"$in": "\x00"}]}, "nul\x00key": None, "~d": 1,
          "$": {".": {"..": "$x.y"}}}


def nested(depth: int) -> dict:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def unsafe_keys(value: Any) -> list[str]:
    """Keys MongoDB could not store verbatim, anywhere in ``value``."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key.startswith("$") or "." in key or "\x00" in key:
                found.append(key)
            found += unsafe_keys(item)
    elif isinstance(value, list):
        for item in value:
            found += unsafe_keys(item)
    return found


def post_raw(client: FlaskClient, headers: dict[str, str], data: str | bytes,
             path: str = "/flows", method: str = "POST") -> Any:
    return client.open(path, method=method, data=data, headers=headers,
                       content_type="application/json")


# ----------------------------------------------------------------------------- routing layer


def test_unknown_route_is_json_404(client: FlaskClient, error_messages) -> None:
    [message] = error_messages(client.get("/no/such/route"), 404)
    assert "not found" in message.lower()


def test_unknown_sub_route_of_a_flow_is_json_404(
    client: FlaskClient, auth: Headers, error_messages
) -> None:
    error_messages(client.get(f"/flows/{ObjectId()}/nothing", headers=auth()), 404)


def test_wrong_method_is_json_405_with_allow(client: FlaskClient, error_messages) -> None:
    response = client.put(f"/flows/{ObjectId()}")
    error_messages(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {
        "GET", "PATCH", "DELETE"}


def test_body_over_the_limit_is_json_413(build_app, auth: Headers, error_messages,
                                         flow_body: Callable[..., dict]) -> None:
    client = build_app(max_body_bytes=2000).test_client()
    body = flow_body(description="x" * 3000)
    assert error_messages(client.post("/flows", json=body, headers=auth()), 413) == [
        "Request body too large: the limit is 2000 bytes."
    ]
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


def test_body_at_the_limit_is_accepted(build_app, auth: Headers,
                                       flow_body: Callable[..., dict]) -> None:
    client = build_app(max_body_bytes=2000).test_client()
    body = flow_body(nodes=1)
    size = len(json.dumps(body))
    body["description"] += "x" * (2000 - size)
    data = json.dumps(body)
    assert len(data) == 2000
    assert post_raw(client, auth(), data).status_code == 201


def test_unexpected_exception_is_json_500_without_details(
    client: FlaskClient, auth: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(FlowService, "list", explode)
    response = client.get("/flows", headers=auth())
    assert response.status_code == 500
    assert response.get_json() == {"errors": [{"message": "Internal server error.",
                                               "code": 500}]}
    text = response.get_data(as_text=True)
    assert "secret internal detail" not in text and "Traceback" not in text


def test_exception_in_any_route_is_json_500(settings: Settings, build_app) -> None:
    app = build_app()

    @app.route("/explode")
    def explode() -> None:
        raise ZeroDivisionError("hidden")

    response = app.test_client().get("/explode")
    assert response.status_code == 500
    assert response.get_json() == {"errors": [{"message": "Internal server error.",
                                               "code": 500}]}


# ----------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize("data", [
    '{"name": "x"', "{'name': 'x'}", "not json", '{"name": NaN}', '{"n": Infinity}',
    '{"n": -Infinity}', '{"flowSettings": {"x": 1e400}}', "[" * 100000,
    '{"a":' * 100000, '{"name": "\\ud800"}', '{"flowSettings": {"\\udfff": 1}}',
])
def test_malformed_json_is_400(
    client: FlaskClient, auth: Headers, error_messages, data: str
) -> None:
    assert error_messages(post_raw(client, auth(), data), 400) == [
        "the request body is not valid JSON"
    ]
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


def test_raw_utf8_encoded_surrogate_is_400(
    client: FlaskClient, auth: Headers, error_messages
) -> None:
    data = b'{"name": "' + "\ud800".encode("utf-8", "surrogatepass") + b'"}'
    error_messages(post_raw(client, auth(), data), 400)


def test_valid_surrogate_pair_and_non_ascii_text_are_kept(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    body = json.dumps(flow_body()).replace('"My flow"', '"\\ud83d\\ude00 \u00e9\u4e2d"')
    response = post_raw(client, auth(), body)
    assert response.status_code == 201
    assert response.get_json()["data"]["name"] == "\U0001f600 \u00e9\u4e2d"


def test_empty_body_is_400(client: FlaskClient, auth: Headers, error_messages) -> None:
    assert error_messages(post_raw(client, auth(), ""), 400) == [
        "the request body must be JSON"
    ]


@pytest.mark.parametrize(("data", "shown"), [
    ('"a string"', "'a string'"), ("42", "42"), ("null", "None"), ("true", "True"),
])
def test_non_object_body_is_400(
    client: FlaskClient, auth: Headers, error_messages, data: str, shown: str
) -> None:
    assert error_messages(post_raw(client, auth(), data), 400) == [
        f"the body must be a JSON object (got {shown})"
    ]


def test_non_object_patch_body_is_400(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    response = post_raw(client, auth(), "[1]", f"/flows/{flow['id']}", "PATCH")
    assert error_messages(response, 400) == ["the body must be a JSON object (got [1])"]


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonx", "text/json", None])
def test_a_body_not_declared_json_is_415_on_every_body_route(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict],
    error_messages, content_type: str | None,
) -> None:
    flow = create()
    headers = auth() if content_type is None else {**auth(), "Content-Type": content_type}
    for method, path, body in (
        ("POST", "/flows", flow_body()), ("POST", "/flows", [flow_body()]),
        ("PATCH", f"/flows/{flow['id']}", {"name": "n"}),
        ("PATCH", "/flows/bulk", [{"id": flow["id"], "name": "n"}]),
        ("POST", "/flows/multiple/start", [flow["id"]]),
        ("POST", "/flows/multiple/stop", [flow["id"]]),
    ):
        response = client.open(path, method=method, data=json.dumps(body), headers=headers)
        (message,) = error_messages(response, 415)
        assert "application/json" in message
    assert client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"] == flow


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "application/vnd.api+json",
    "APPLICATION/JSON"])
def test_json_and_plus_json_bodies_are_accepted(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict], content_type: str
) -> None:
    response = client.post("/flows", data=json.dumps(flow_body()), headers=auth(),
                           content_type=content_type)
    assert response.status_code == 201


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json"])
def test_bodiless_start_and_stop_work_with_or_without_a_content_type(
    client: FlaskClient, auth: Headers, create: Create, content_type: str | None
) -> None:
    flow = create()
    headers = auth() if content_type is None else {**auth(), "Content-Type": content_type}
    started = client.post(f"/flows/{flow['id']}/start", headers=headers)
    assert started.status_code == 200, started.get_json()
    stopped = client.post(f"/flows/{flow['id']}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.get_json()


def test_bulk_routes_need_a_json_array(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    response = client.patch("/flows/bulk", json={"id": flow["id"]}, headers=auth())
    assert error_messages(response, 400) == ["the body must be a JSON array of flows with ids"]


def test_empty_bulk_is_400(client: FlaskClient, auth: Headers, error_messages) -> None:
    assert error_messages(client.post("/flows", json=[], headers=auth()), 400) == [
        "the list of items is empty"
    ]
    assert error_messages(client.patch("/flows/bulk", json=[], headers=auth()), 400) == [
        "the list of items is empty"
    ]


def test_bulk_over_the_item_limit_is_400_and_stores_nothing(
    build_app, auth: Headers, error_messages, flow_body: Callable[..., dict]
) -> None:
    client = build_app(bulk_max_items=2).test_client()
    response = client.post("/flows", json=[flow_body()] * 3, headers=auth())
    assert error_messages(response, 400) == ["at most 2 items per request (got 3)"]
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


# ----------------------------------------------------------------------------- malformed ids


@pytest.mark.parametrize("raw_id", ["123", "g" * 24, "0" * 25, "0" * 24 + "%0A"])
def test_malformed_flow_id_is_400(
    client: FlaskClient, auth: Headers, error_messages, raw_id: str
) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = client.open(f"/flows/{raw_id}", method=method, json={"name": "x"},
                               headers=auth())
        [message] = error_messages(response, 400)
        assert message.startswith("invalid flow id ")
    [message] = error_messages(client.post(f"/flows/{raw_id}/start", headers=auth()), 400)
    assert message.startswith("invalid flow id ")


# ----------------------------------------------------------------------------- validation


def test_every_validation_problem_is_reported_at_once(
    client: FlaskClient, auth: Headers, error_messages
) -> None:
    body = {
        "name": 7,
        "status": "active",
        "color": "red",
        "cron": "whenever",
        "fromTemplate": "tmpl",
        "owners": [{"id": "x"}, {"type": "user"}],
        "graph": {
            "nodes": [
                {"id": "n" * 31, "componentId": "comp", "function": "f"},
                {"id": "b", "componentId": "0" * 24, "function": "f", "credentials_id": "cred"},
                {"id": "b", "componentId": "0" * 24},
            ],
            "edges": [{"source": "b", "target": "nowhere"}, {"target": "b"}],
        },
    }
    messages = error_messages(client.post("/flows", json=body, headers=auth()), 400)
    assert sorted(messages) == sorted([
        STATUS_MESSAGE,
        "name: Not a valid string (got 7)",
        "cron: is not a valid cron expression (got 'whenever')",
        "fromTemplate: is not a valid ObjectId (got 'tmpl')",
        "owners[0].type: Missing data for required field",
        "owners[1].id: Missing data for required field",
        f"graph.nodes[0].id: Length must be between 1 and 30 (got '{'n' * 31}')",
        "graph.nodes[0].componentId: is not a valid ObjectId (got 'comp')",
        "graph.nodes[1].credentials_id: is not a valid ObjectId (got 'cred')",
        "graph.nodes[2].function: Missing data for required field",
        "graph.nodes[2].id: duplicate node id 'b' (also graph.nodes[1])",
        "graph.edges[0].target: 'nowhere' does not name a node of this flow",
        "graph.edges[1].source: Missing data for required field",
    ])
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


@pytest.mark.parametrize(("graph", "expected"), [
    (None, ["graph: Field may not be null (got None)"]),
    ({"nodes": []}, ["graph.nodes: a flow needs at least one node"]),
    ({"edges": []}, ["graph.nodes: Missing data for required field"]),
    ({"nodes": [{"id": "a", "componentId": "0" * 24, "function": "f"},
                {"id": "b", "componentId": "0" * 24, "function": "f"}]},
     ["graph.edges: a flow with more than one node needs edges"]),
])
def test_graph_rules_are_enforced_on_create(
    client: FlaskClient, auth: Headers, error_messages, graph: Any, expected: list[str]
) -> None:
    response = client.post("/flows", json={"name": "x", "graph": graph}, headers=auth())
    assert error_messages(response, 400) == expected


def test_missing_graph_is_400(client: FlaskClient, auth: Headers, error_messages) -> None:
    response = client.post("/flows", json={"name": "no graph"}, headers=auth())
    assert error_messages(response, 400) == ["graph: Missing data for required field"]


@pytest.mark.parametrize("status", ["active", "starting", None, 0])
def test_a_status_other_than_inactive_in_a_new_flow_is_400(
    client: FlaskClient, auth: Headers, error_messages, flow_body: Callable[..., dict],
    status: Any,
) -> None:
    response = client.post("/flows", json=flow_body(status=status), headers=auth())
    assert error_messages(response, 400) == [STATUS_MESSAGE.replace("'active'", repr(status))]
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


def test_integer_beyond_int64_is_400(
    client: FlaskClient, auth: Headers, error_messages, flow_body: Callable[..., dict]
) -> None:
    body = flow_body(flowSettings={"big": 2**63})
    body["graph"]["nodes"][0]["fields"] = {"list": [-(2**63) - 1]}
    messages = error_messages(client.post("/flows", json=body, headers=auth()), 400)
    assert sorted(messages) == [
        ("flowSettings: integer 9223372036854775808 exceeds 64 bits "
         "(got {'big': 9223372036854775808})"),
        ("graph.nodes[0].fields: integer -9223372036854775809 exceeds 64 bits "
         "(got {'list': [-9223372036854775809]})"),
    ]


def test_int64_limits_are_stored_exactly(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    flow = create(flow_body(flowSettings={"max": 2**63 - 1, "min": -(2**63)}))
    stored = client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"]
    assert stored["flowSettings"] == {"max": 2**63 - 1, "min": -(2**63)}


def test_free_form_nesting_beyond_the_limit_is_400(
    client: FlaskClient, auth: Headers, error_messages, flow_body: Callable[..., dict]
) -> None:
    body = flow_body()
    body["graph"]["edges"][0]["config"]["mapper"] = nested(JSON_MAX_DEPTH + 1)
    [message] = error_messages(client.post("/flows", json=body, headers=auth()), 400)
    assert message.startswith(
        f"graph.edges[0].config.mapper: nested deeper than {JSON_MAX_DEPTH} levels")


def test_free_form_nesting_at_the_limit_is_stored(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    flow = create(flow_body(flowSettings=nested(JSON_MAX_DEPTH)))
    stored = client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"]
    assert stored["flowSettings"] == nested(JSON_MAX_DEPTH)


def test_special_keys_are_stored_safely_and_returned_unchanged(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict],
    store: FlowStore,
) -> None:
    body = flow_body(flowSettings=UNSAFE)
    body["graph"]["nodes"][0]["fields"] = UNSAFE
    body["graph"]["nodes"][1]["nodeSettings"] = {"list": [UNSAFE]}
    body["graph"]["edges"][0]["config"]["mapper"] = UNSAFE
    flow = create(body)
    assert flow["graph"] == body["graph"]
    assert flow["flowSettings"] == UNSAFE
    fetched = client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"]
    assert (fetched["graph"], fetched["flowSettings"]) == (body["graph"], UNSAFE)
    [listed] = client.get("/flows", headers=auth()).get_json()["data"]
    assert (listed["graph"], listed["flowSettings"]) == (body["graph"], UNSAFE)
    raw = store.raw(ObjectId(flow["id"]))
    assert unsafe_keys(raw) == []
    assert decode_keys(raw)["flowSettings"] == UNSAFE


def test_special_keys_survive_a_patch(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore
) -> None:
    flow = create()
    response = client.patch(f"/flows/{flow['id']}", json={"flowSettings": UNSAFE},
                            headers=auth())
    assert response.status_code == 200
    assert response.get_json()["data"]["flowSettings"] == UNSAFE
    fetched = client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"]
    assert fetched["flowSettings"] == UNSAFE
    assert unsafe_keys(store.raw(ObjectId(flow["id"]))) == []


# ----------------------------------------------------------------------------- rejected PATCH


@pytest.mark.parametrize(("patch", "expected"), [
    ({"graph": {"nodes": [{"id": "a", "componentId": "0" * 24, "function": "f"},
                          {"id": "b", "componentId": "0" * 24, "function": "f"}]}},
     ["graph.edges: a flow with more than one node needs edges"]),
    ({"graph": {"nodes": [{"id": "a"}]}},
     ["graph.nodes[0].componentId: Missing data for required field",
      "graph.nodes[0].function: Missing data for required field"]),
    ({"status": "active"}, [STATUS_MESSAGE]),
    ({"status": None}, [STATUS_MESSAGE.replace("'active'", "None")]),
    ({"name": "ok", "owner": "me", "cron": "never"},
     ["cron: is not a valid cron expression (got 'never')"]),
    ({"cron": "never"}, ["cron: is not a valid cron expression (got 'never')"]),
    ({"flowSettings": {"n": 2**64}},
     [("flowSettings: integer 18446744073709551616 exceeds 64 bits "
       "(got {'n': 18446744073709551616})")]),
    ({"graph": None}, ["graph: Field may not be null (got None)"]),
])
def test_rejected_patch_leaves_the_flow_unchanged(
    client: FlaskClient, auth: Headers, create: Create, error_messages, store: FlowStore,
    patch: dict, expected: list[str],
) -> None:
    flow = create()
    before = store.raw(ObjectId(flow["id"]))
    response = client.patch(f"/flows/{flow['id']}", json=patch, headers=auth())
    assert sorted(error_messages(response, 400)) == sorted(expected)
    assert store.raw(ObjectId(flow["id"])) == before
    assert client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"] == flow


def test_patch_read_only_fields_are_ignored(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    response = client.patch(f"/flows/{flow['id']}", headers=auth(), json={
        "id": str(ObjectId()), "revision": 40, "tenant": "t-x", "createdAt": "x",
        "updatedAt": "y", "statusChangedAt": "z", "statusReason": "r"})
    assert response.status_code == 200
    data = response.get_json()["data"]
    assert (data["id"], data["revision"], data["tenant"], data["createdAt"]) == (
        flow["id"], 2, "tenant-1", flow["createdAt"])
    assert data["statusReason"] == "created"


# ----------------------------------------------------------------------------- query arguments


@pytest.mark.parametrize(("query", "field"), [
    ("page[size]=0", "page[size]"),
    ("page[size]=-5", "page[size]"),
    ("page[size]=1.5", "page[size]"),
    ("page[size]=abc", "page[size]"),
    ("page[number]=0", "page[number]"),
    ("page[number]=x", "page[number]"),
    ("filter[status]=running", "filter[status]"),
    ("filter[fromTemplate]=abc", "filter[fromTemplate]"),
    ("sort=owner", "sort"),
    ("sort=%2Bname", "sort"),
    ("sort=--name", "sort"),
    ("search=" + "s" * 201, "search"),
])
def test_bad_list_arguments_are_400_naming_argument_and_value(
    client: FlaskClient, auth: Headers, error_messages, query: str, field: str
) -> None:
    [message] = error_messages(client.get(f"/flows?{query}", headers=auth()), 400)
    assert message.startswith(f"{field}: ")
    assert "(got '" in message


# ----------------------------------------------------------------------------- identity


def test_missing_authorization_is_401_with_the_oih_message(
    client: FlaskClient, error_messages
) -> None:
    response = client.get("/flows")
    assert error_messages(response, 401) == ["Missing authorization header."]
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc",
                                    "Bearer a b"])
def test_bad_authorization_scheme_is_401(
    client: FlaskClient, error_messages, header: str
) -> None:
    response = client.get("/flows", headers={"Authorization": header})
    assert error_messages(response, 401) == ["Invalid authorization header."]


def test_garbage_token_is_401(client: FlaskClient, error_messages) -> None:
    response = client.get("/flows", headers={"Authorization": "Bearer not.a.jwt"})
    assert error_messages(response, 401) == ["Invalid token."]


def test_expired_token_is_401(client: FlaskClient, token, error_messages) -> None:
    response = client.get("/flows", headers={"Authorization": f"Bearer {token(ttl=-10)}"})
    assert error_messages(response, 401) == ["Token expired."]


def test_forged_token_is_401(client: FlaskClient, settings: Settings, error_messages) -> None:
    forged = mint_token(settings.replace(jwt_secret="some-other-secret-" * 4), "user-1",
                        "tenant-1", ["all"])
    response = client.get("/flows", headers={"Authorization": f"Bearer {forged}"})
    assert error_messages(response, 401) == ["Invalid token."]


def test_token_for_another_audience_is_401(
    build_app, settings: Settings, error_messages
) -> None:
    client = build_app(jwt_secret=JWT_SECRET, jwt_audience="flow-repository").test_client()
    ours = mint_token(settings.replace(jwt_secret=JWT_SECRET, jwt_audience="flow-repository"),
                      "user-1", None, ["flows.read"])
    theirs = mint_token(settings.replace(jwt_secret=JWT_SECRET, jwt_audience="other-service"),
                        "user-1", None, ["flows.read"])
    assert client.get("/flows", headers={"Authorization": f"Bearer {ours}"}).status_code == 200
    response = client.get("/flows", headers={"Authorization": f"Bearer {theirs}"})
    assert error_messages(response, 401) == ["Invalid token."]


def test_unreachable_iam_is_503_not_401(build_app, auth: Headers, error_messages) -> None:
    client = build_app(introspect_endpoint_basic="http://127.0.0.1:9/introspect").test_client()
    response = client.get("/flows", headers=auth())
    assert error_messages(response, 503) == ["Identity service is unavailable; retry later."]
    assert response.headers["Retry-After"] == "5"


def test_authentication_comes_before_reading_the_body(
    client: FlaskClient, error_messages
) -> None:
    assert error_messages(post_raw(client, {}, "{broken"), 401) == [
        "Missing authorization header."]
    response = client.patch(f"/flows/{ObjectId()}", data="{broken",
                            content_type="application/json")
    error_messages(response, 401)


@pytest.mark.parametrize(("method", "path", "body", "needed"), [
    ("GET", "/flows", None, "flows.read"),
    ("GET", "/flows/{id}", None, "flows.read"),
    ("POST", "/flows", "flow", "flows.write"),
    ("POST", "/flows", "flows", "flows.bulk"),
    ("PATCH", "/flows/{id}", {"name": "x"}, "flows.write"),
    ("DELETE", "/flows/{id}", None, "flows.write"),
    ("PATCH", "/flows/bulk", "items", "flows.bulk"),
    ("PATCH", "/flows/bulk", "items", "flows.write"),
    ("POST", "/flows/{id}/start", None, "flows.control"),
    ("POST", "/flows/{id}/stop", None, "flows.control"),
])
def test_missing_permission_is_403_and_changes_nothing(
    client: FlaskClient, auth: Headers, create: Create, error_messages, store: FlowStore,
    flow_body: Callable[..., dict], method: str, path: str, body: Any, needed: str,
) -> None:
    flow = create()
    before = store.raw(ObjectId(flow["id"]))
    payload = body if not isinstance(body, str) else {
        "flow": flow_body(), "flows": [flow_body()],
        "items": [{"id": flow["id"], "name": "x"}]}[body]
    everything = ["flows.read", "flows.write", "flows.control", "flows.bulk"]
    lacking = auth("user-1", "tenant-1", [p for p in everything if p != needed])
    response = client.open(path.format(id=flow["id"]), method=method, json=payload,
                           headers=lacking)
    assert error_messages(response, 403) == ["MISSING_PERMISSION"]
    assert store.raw(ObjectId(flow["id"])) == before
    total = client.get("/flows", headers=auth()).get_json()["meta"]["total"]
    assert total == 1


# ----------------------------------------------------------------------------- storage outage


@pytest.fixture
def down_client(build_app, down_store: FlowStore) -> FlaskClient:
    return build_app(store_override=down_store).test_client()


def test_unreachable_mongodb_makes_list_503(
    down_client: FlaskClient, auth: Headers, error_messages
) -> None:
    response = down_client.get("/flows", headers=auth())
    assert error_messages(response, 503) == ["Database is unavailable; retry later."]
    assert response.headers["Retry-After"] == "5"


def test_unreachable_mongodb_makes_create_503(
    down_client: FlaskClient, auth: Headers, error_messages, flow_body: Callable[..., dict]
) -> None:
    response = down_client.post("/flows", json=flow_body(), headers=auth())
    assert error_messages(response, 503) == ["Database is unavailable; retry later."]


def test_unreachable_mongodb_makes_read_and_patch_503(
    down_client: FlaskClient, auth: Headers, error_messages
) -> None:
    flow_id = str(ObjectId())
    error_messages(down_client.get(f"/flows/{flow_id}", headers=auth()), 503)
    error_messages(down_client.patch(f"/flows/{flow_id}", json={"name": "x"},
                                     headers=auth()), 503)
    error_messages(down_client.delete(f"/flows/{flow_id}", headers=auth()), 503)


def test_unreachable_mongodb_fails_the_healthcheck(down_client: FlaskClient) -> None:
    response = down_client.get("/healthcheck")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "fail"
    assert body["details"]["mongoDB"]["status"] == "fail"
