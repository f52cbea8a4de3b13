"""REST API happy paths and their edges: CRUD, listing, ownership, bulk, CORS and plumbing."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId
from flask.testing import FlaskClient

from flow_repository.adapters.store import FlowStore, utcnow

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEX_ID = re.compile(r"^[0-9a-f]{24}$")
TEMPLATE = "65a1b2c3d4e5f60718293a4b"
INTERNAL_FIELDS = ("_id", "outbox", "relayLeaseUntil", "relayLeaseOwner", "deletedAt",
                   "statusRetries", "startedBy")
PUBLIC_FLOW_KEYS = {"id", "name", "description", "type", "graph", "owners", "tenant", "status",
                    "createdAt", "updatedAt", "revision", "statusChangedAt", "statusReason"}

Headers = Callable[..., dict[str, str]]
Create = Callable[..., dict[str, Any]]


def ids(response) -> list[str]:
    return [flow["id"] for flow in response.get_json()["data"]]


def admin_user_1(auth: Headers) -> dict[str, str]:
    """user-1 of tenant-1 as an administrator: free to set any owners (see test_ownership)."""
    return auth("user-1", "tenant-1", ["all"])


def names(response) -> list[str]:
    return [flow["name"] for flow in response.get_json()["data"]]


# ----------------------------------------------------------------------------- create and read


def test_create_returns_201_with_the_whole_flow_and_its_etag(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    body = flow_body(cron="*/5 * * * *", fromTemplate=TEMPLATE, flowSettings={"retry": 3})
    response = client.post("/flows", json=body, headers=auth())
    assert response.status_code == 201
    assert response.headers["ETag"] == '"1"'
    envelope = response.get_json()
    assert envelope["meta"] == {}  # OIH's single-flow answers carry an empty meta
    flow = envelope["data"]
    assert set(flow) == PUBLIC_FLOW_KEYS | {"cron", "fromTemplate", "flowSettings"}
    assert HEX_ID.match(flow["id"])
    assert flow["graph"] == body["graph"]
    assert (flow["name"], flow["description"]) == (body["name"], body["description"])
    assert (flow["cron"], flow["fromTemplate"], flow["flowSettings"]) == (
        "*/5 * * * *", TEMPLATE, {"retry": 3})
    assert flow["owners"] == [{"id": "user-1", "type": "user"},
                              {"id": "tenant-1", "type": "tenant"}]
    assert (flow["tenant"], flow["status"], flow["type"], flow["revision"]) == (
        "tenant-1", "inactive", "ordinary", 1)
    assert flow["statusReason"] == "created"
    for stamp in ("createdAt", "updatedAt", "statusChangedAt"):
        assert ISO_UTC.match(flow[stamp]), flow[stamp]


def test_created_flow_is_stored_as_returned(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    response = client.get(f"/flows/{flow['id']}", headers=auth())
    assert response.status_code == 200
    assert response.get_json() == {"data": flow, "meta": {}}
    assert response.headers["ETag"] == '"1"'


def test_create_keeps_given_owners_and_adds_the_caller_and_tenant_once(
    create: Create, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    owners = [{"id": "partner", "type": "user"}, {"id": "user-1", "type": "user"}]
    flow = create(flow_body(owners=owners), headers=admin_user_1(auth))
    assert flow["owners"] == [*owners, {"id": "tenant-1", "type": "tenant"}]


def test_create_without_a_tenant_makes_the_caller_the_only_owner(
    create: Create, auth: Headers
) -> None:
    flow = create(headers=auth("loner", None))
    assert flow["owners"] == [{"id": "loner", "type": "user"}]
    assert flow["tenant"] is None


def test_create_keeps_a_given_type(create: Create, flow_body: Callable[..., dict]) -> None:
    assert create(flow_body(type="realtime"))["type"] == "realtime"


def test_create_ignores_read_only_fields(
    create: Create, flow_body: Callable[..., dict], store: FlowStore
) -> None:
    forged_id = str(ObjectId())
    body = flow_body(id=forged_id, createdAt="2000-01-01T00:00:00.000Z",
                     updatedAt="2000-01-01T00:00:00.000Z", revision=99, tenant="tenant-x",
                     statusChangedAt="2000-01-01T00:00:00.000Z", statusReason="forged")
    flow = create(body)
    assert flow["id"] != forged_id
    assert (flow["revision"], flow["tenant"], flow["statusReason"]) == (1, "tenant-1", "created")
    assert not flow["createdAt"].startswith("2000")
    assert store.raw(ObjectId(forged_id)) is None


def test_get_unknown_flow_is_404(client: FlaskClient, auth: Headers, error_messages) -> None:
    missing = str(ObjectId())
    assert error_messages(client.get(f"/flows/{missing}", headers=auth()), 404) == [
        f"flow {missing} not found"
    ]


def test_ids_and_timestamps_have_the_public_format(create: Create) -> None:
    flow = create()
    assert HEX_ID.match(flow["id"])
    assert flow["createdAt"] == flow["updatedAt"]
    assert ISO_UTC.match(flow["createdAt"])


# ----------------------------------------------------------------------------- update and delete


def test_patch_of_the_name_changes_only_the_name(
    client: FlaskClient, auth: Headers, create: Create, clock
) -> None:
    flow = create()
    response = client.patch(f"/flows/{flow['id']}", json={"name": "renamed"}, headers=auth())
    assert response.status_code == 200
    assert response.headers["ETag"] == '"2"'
    updated = response.get_json()["data"]
    assert updated == {**flow, "name": "renamed", "revision": 2,
                       "updatedAt": updated["updatedAt"]}
    assert updated["updatedAt"] > flow["updatedAt"]
    assert response.get_json()["meta"] == {}
    assert client.get(f"/flows/{flow['id']}", headers=auth()).get_json() == {"data": updated,
                                                                             "meta": {}}


def test_patch_sets_updated_at_to_the_write_time(
    client: FlaskClient, auth: Headers, create: Create, clock
) -> None:
    flow = create()
    response = client.patch(f"/flows/{flow['id']}", json={"name": "x"}, headers=auth())
    updated = response.get_json()["data"]
    assert updated["updatedAt"] == clock.now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert updated["createdAt"] == flow["createdAt"]


def test_patch_replaces_the_graph_with_a_valid_new_one(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    flow = create()
    graph = flow_body(nodes=3)["graph"]
    response = client.patch(f"/flows/{flow['id']}", json={"graph": graph}, headers=auth())
    assert response.status_code == 200
    assert response.get_json()["data"]["graph"] == graph


def test_patch_accepts_a_flow_as_returned_by_get(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    edited = {key: value for key, value in flow.items() if key != "status"}
    edited["description"] = "edited"
    response = client.patch(f"/flows/{flow['id']}", json=edited, headers=auth())
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["data"]["description"] == "edited"
    assert response.get_json()["data"]["createdAt"] == flow["createdAt"]


def test_patch_re_adds_the_caller_when_owners_omit_it(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    owners = [{"id": "tenant-1", "type": "tenant"}]
    response = client.patch(f"/flows/{flow['id']}", json={"owners": owners}, headers=auth())
    assert response.get_json()["data"]["owners"] == [*owners, {"id": "user-1", "type": "user"}]


def test_patch_without_owners_keeps_the_stored_owners(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    flow = create(flow_body(owners=[{"id": "partner", "type": "user"}]),
                  headers=admin_user_1(auth))
    response = client.patch(f"/flows/{flow['id']}", json={"name": "n"}, headers=auth())
    assert response.get_json()["data"]["owners"] == flow["owners"]


def test_delete_removes_the_flow_from_reads_and_lists(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    kept = create(name="kept")
    response = client.delete(f"/flows/{flow['id']}", headers=auth())
    assert response.status_code == 200
    # services/flow-repository/app/api/controllers/flow.js answers exactly this
    assert response.get_json() == {"msg": "Flow was successfully deleted"}
    error_messages(client.get(f"/flows/{flow['id']}", headers=auth()), 404)
    assert ids(client.get("/flows", headers=auth())) == [kept["id"]]
    error_messages(client.delete(f"/flows/{flow['id']}", headers=auth()), 404)
    error_messages(client.patch(f"/flows/{flow['id']}", json={"name": "x"}, headers=auth()), 404)


# ----------------------------------------------------------------------------- listing


def test_list_returns_data_and_meta_with_defaults(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    created = [create(name=f"f{i:02}") for i in range(12)]
    response = client.get("/flows", headers=auth())
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"data", "meta"}
    assert body["meta"] == {"total": 12, "page": 1, "perPage": 10, "totalPages": 2}
    assert body["data"] == created[:10]


def test_list_pages_by_size_and_number(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    created = [create(name=f"f{i}") for i in range(5)]
    response = client.get("/flows?page[size]=2&page[number]=3", headers=auth())
    assert response.get_json()["meta"] == {"total": 5, "page": 3, "perPage": 2, "totalPages": 3}
    assert ids(response) == [created[4]["id"]]
    beyond = client.get("/flows?page[size]=2&page[number]=4", headers=auth()).get_json()
    assert beyond == {"data": [], "meta": {"total": 5, "page": 4, "perPage": 2,
                                          "totalPages": 3}}


def test_list_accepts_the_largest_page_size(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    create()
    response = client.get("/flows?page[size]=100", headers=auth())
    assert response.status_code == 200
    assert response.get_json()["meta"]["perPage"] == 100


def test_empty_list_has_zero_pages(client: FlaskClient, auth: Headers) -> None:
    assert client.get("/flows", headers=auth()).get_json() == {
        "data": [], "meta": {"total": 0, "page": 1, "perPage": 10, "totalPages": 0}}


def test_list_filters_by_status(
    client: FlaskClient, auth: Headers, create: Create, start_flow
) -> None:
    running = create(name="running")
    idle = create(name="idle")
    start_flow(running["id"])
    assert ids(client.get("/flows?filter[status]=starting", headers=auth())) == [running["id"]]
    assert ids(client.get("/flows?filter[status]=inactive", headers=auth())) == [idle["id"]]
    assert ids(client.get("/flows?filter[status]=active", headers=auth())) == []


def test_list_filters_by_type(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    realtime = create(flow_body(type="realtime"))
    create()
    assert ids(client.get("/flows?filter[type]=realtime", headers=auth())) == [realtime["id"]]


def test_list_filters_by_template(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    templated = create(flow_body(fromTemplate=TEMPLATE))
    create()
    response = client.get(f"/flows?filter[fromTemplate]={TEMPLATE}", headers=auth())
    assert ids(response) == [templated["id"]]
    assert ids(client.get(f"/flows?filter[fromTemplate]={'f' * 24}", headers=auth())) == []


def test_list_filters_by_owner_user(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    shared = create(flow_body(owners=[{"id": "partner", "type": "user"}]),
                    headers=admin_user_1(auth))
    create()
    assert ids(client.get("/flows?filter[user]=partner", headers=auth())) == [shared["id"]]


@pytest.mark.parametrize(("sort", "expected"), [
    ("name", ["alpha", "bravo", "charlie"]),
    ("-name", ["charlie", "bravo", "alpha"]),
    ("createdAt", ["bravo", "charlie", "alpha"]),
    ("-createdAt", ["alpha", "charlie", "bravo"]),
    ("updatedAt", ["charlie", "alpha", "bravo"]),
    ("-updatedAt", ["bravo", "alpha", "charlie"]),
])
def test_list_sorts_by_field_and_direction(
    client: FlaskClient, auth: Headers, create: Create, clock, sort: str, expected: list[str]
) -> None:
    flows = {name: create(name=name) for name in ("bravo", "charlie", "alpha")}
    for name in ("alpha", "bravo"):  # updated in this order, after every creation
        response = client.patch(f"/flows/{flows[name]['id']}", json={}, headers=auth())
        assert response.status_code == 200
    assert names(client.get(f"/flows?sort={sort}", headers=auth())) == expected


def test_list_without_sort_is_oldest_first(
    client: FlaskClient, auth: Headers, create: Create, clock
) -> None:
    for name in ("b", "c", "a"):
        create(name=name)
    assert names(client.get("/flows", headers=auth())) == ["b", "c", "a"]


@pytest.mark.parametrize(("search", "expected"), [
    (".*", ["dot.*star"]),
    ("(", ["open(paren"]),
    ("[", ["open[bracket"]),
    ("\\", ["back\\slash"]),
    ("a+", ["a+b"]),
    ("$", ["price$"]),
    ("^", ["caret^"]),
    ("?|{", ["q?|{"]),
    ("DOT.*STAR", ["dot.*star"]),
    ("zzz", []),
])
def test_search_matches_name_text_literally_and_case_insensitively(
    client: FlaskClient, auth: Headers, create: Create, search: str, expected: list[str]
) -> None:
    for name in ("dot.*star", "open(paren", "open[bracket", "back\\slash", "a+b", "aab",
                 "price$", "caret^", "q?|{", "plain"):
        create(name=name, description="nothing special")
    response = client.get("/flows", query_string={"search": search}, headers=auth())
    assert response.status_code == 200
    assert names(response) == expected


def test_search_matches_the_description_too(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    described = create(flow_body(name="one", description="Moves Orders to the ERP"))
    create(flow_body(name="two", description="other"))
    response = client.get("/flows", query_string={"search": "orders TO"}, headers=auth())
    assert ids(response) == [described["id"]]
    assert response.get_json()["meta"]["total"] == 1


def test_search_of_200_characters_is_accepted(client: FlaskClient, auth: Headers) -> None:
    response = client.get("/flows", query_string={"search": "s" * 200}, headers=auth())
    assert response.status_code == 200


# ----------------------------------------------------------------------------- ownership


def test_another_users_flow_is_404_for_every_route(
    client: FlaskClient, auth: Headers, create: Create, error_messages, store: FlowStore
) -> None:
    flow = create()
    stranger = auth("stranger", "tenant-2")
    path = f"/flows/{flow['id']}"
    error_messages(client.get(path, headers=stranger), 404)
    error_messages(client.patch(path, json={"name": "stolen"}, headers=stranger), 404)
    error_messages(client.delete(path, headers=stranger), 404)
    error_messages(client.post(f"{path}/start", headers=stranger), 404)
    assert client.get("/flows", headers=stranger).get_json()["data"] == []
    after = client.get(path, headers=auth()).get_json()["data"]
    assert after == flow
    assert store.raw(ObjectId(flow["id"])).get("deletedAt") is None


def test_tenant_members_see_and_change_the_tenants_flows(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    colleague = auth("colleague", "tenant-1")
    assert ids(client.get("/flows", headers=colleague)) == [flow["id"]]
    response = client.patch(f"/flows/{flow['id']}", json={"name": "n"}, headers=colleague)
    assert response.status_code == 200
    assert {"id": "colleague", "type": "user"} in response.get_json()["data"]["owners"]


def test_a_user_owner_without_tenant_sees_the_flow(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict]
) -> None:
    flow = create(flow_body(owners=[{"id": "partner", "type": "user"}]),
                  headers=admin_user_1(auth))
    partner = auth("partner", None)
    assert client.get(f"/flows/{flow['id']}", headers=partner).status_code == 200
    assert ids(client.get("/flows", headers=partner)) == [flow["id"]]


def test_admin_sees_and_changes_every_flow(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    mine = create()
    theirs = create(headers=auth("stranger", "tenant-2"))
    admin = auth("admin", None, ["all"])
    response = client.get("/flows", headers=admin)
    assert response.get_json()["meta"]["total"] == 2
    assert sorted(ids(response)) == sorted([mine["id"], theirs["id"]])
    assert client.get(f"/flows/{theirs['id']}", headers=admin).status_code == 200
    patched = client.patch(f"/flows/{theirs['id']}", json={"name": "fixed"}, headers=admin)
    assert patched.status_code == 200
    assert client.delete(f"/flows/{mine['id']}", headers=admin).status_code == 200


def test_filter_user_never_widens_a_non_admin_view(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    theirs = create(headers=auth("stranger", "tenant-2"))
    create()
    response = client.get("/flows?filter[user]=stranger", headers=auth())
    assert response.get_json() == {"data": [], "meta": {"total": 0, "page": 1, "perPage": 10,
                                                        "totalPages": 0}}
    admin = client.get("/flows?filter[user]=stranger", headers=auth("admin", None, ["all"]))
    assert ids(admin) == [theirs["id"]]


# ----------------------------------------------------------------------------- bulk


def test_bulk_create_returns_201_with_the_created_flows_aligned_with_the_input(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    response = client.post("/flows", json=[flow_body("one"), flow_body("two")], headers=auth())
    assert response.status_code == 201
    body = response.get_json()
    assert body["meta"] == {"total": 2, "succeeded": 2, "failed": 0}
    assert [item["name"] for item in body["data"]] == ["one", "two"]
    for item in body["data"]:
        assert set(item) == PUBLIC_FLOW_KEYS
        stored = client.get(f"/flows/{item['id']}", headers=auth()).get_json()["data"]
        assert stored == item


def test_bulk_create_stores_valid_items_past_an_invalid_one(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    items = [{"name": "broken"}, flow_body("good"), "not an object"]
    response = client.post("/flows", json=items, headers=auth())
    assert response.status_code == 201  # as OIH: per-item outcomes in an aligned data
    body = response.get_json()
    assert body["meta"] == {"total": 3, "succeeded": 1, "failed": 2}
    broken, good, junk = body["data"]
    assert broken == {"errors": [
        {"message": "graph: Missing data for required field", "code": 400}]}
    assert good["name"] == "good" and set(good) == PUBLIC_FLOW_KEYS
    assert junk == {"errors": [
        {"message": "the body must be a JSON object (got 'not an object')", "code": 400}]}
    assert names(client.get("/flows", headers=auth())) == ["good"]


def test_bulk_create_with_all_permission_is_allowed(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    response = client.post("/flows", json=[flow_body()], headers=auth("admin", None, ["all"]))
    assert response.status_code == 201


def test_bulk_update_returns_200_when_every_item_succeeds(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    first, second = create(name="a"), create(name="b")
    items = [{"id": first["id"], "name": "a2"}, {"id": second["id"], "description": "d2"}]
    response = client.patch("/flows/bulk", json=items, headers=auth())
    assert response.status_code == 200
    body = response.get_json()
    assert body["meta"] == {"total": 2, "succeeded": 2, "failed": 0}
    assert [item["id"] for item in body["data"]] == [first["id"], second["id"]]
    assert [item["revision"] for item in body["data"]] == [2, 2]
    assert client.get(f"/flows/{first['id']}", headers=auth()).get_json()["data"]["name"] == "a2"
    stored = client.get(f"/flows/{second['id']}", headers=auth()).get_json()["data"]
    assert (stored["name"], stored["description"], stored["revision"]) == ("b", "d2", 2)


def test_bulk_update_reports_each_failure_and_applies_the_rest(
    client: FlaskClient, auth: Headers, create: Create, start_flow
) -> None:
    good, running = create(name="good"), create(name="running")
    start_flow(running["id"])
    missing = str(ObjectId())
    items = [
        {"id": good["id"], "name": "better"},
        {"id": missing, "name": "x"},
        {"id": running["id"], "name": "x"},
        {"id": good["id"], "cron": "never"},
        {"name": "no id"},
    ]
    response = client.patch("/flows/bulk", json=items, headers=auth())
    assert response.status_code == 200  # per-item outcomes in an aligned data
    body = response.get_json()
    assert body["meta"] == {"total": 5, "succeeded": 1, "failed": 4}
    assert body["data"][0]["name"] == "better"
    assert [item["errors"][0]["code"] for item in body["data"][1:]] == [404, 409, 400, 400]
    assert body["data"][1]["errors"] == [{"message": f"flow {missing} not found", "code": 404}]
    assert body["data"][3]["errors"] == [
        {"message": "cron: is not a valid cron expression (got 'never')", "code": 400}]
    assert all(set(item) == {"errors"} for item in body["data"][1:])
    assert client.get(f"/flows/{good['id']}", headers=auth()).get_json()["data"]["name"] == (
        "better")
    stored = client.get(f"/flows/{running['id']}", headers=auth()).get_json()["data"]
    assert stored["name"] == "running"


# ----------------------------------------------------------------------------- service routes


def test_healthcheck_passes_without_a_token(client: FlaskClient) -> None:
    response = client.get("/healthcheck")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "pass"
    assert body["details"]["mongoDB"] == {"status": "pass"}
    assert body["details"]["queue"]["status"] == "pass"


def test_api_docs_serves_swagger_ui(client: FlaskClient) -> None:
    response = client.get("/api-docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "swagger-ui" in page
    assert "/openapi.json" in page


def test_api_docs_loads_its_scripts_from_this_service_not_a_cdn(client: FlaskClient) -> None:
    page = client.get("/api-docs").get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(asset.startswith("/api-docs/assets/") for asset in assets)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.data) > 1000


def test_openapi_json_is_served_without_a_token(client: FlaskClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json()["info"]["title"] == "Flow Repository"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/flows/", 200),
    ("POST", "/flows/", 201),
    ("GET", "/flows/{id}/", 200),
    ("PATCH", "/flows/{id}/", 200),
    ("DELETE", "/flows/{id}/", 200),
    ("PATCH", "/flows/bulk/", 200),
    ("POST", "/flows/{id}/start/", 200),
    ("GET", "/flows/{id}/steps/step_0/logs/", 501),  # matched; no logging service here
    ("GET", "/healthcheck/", 200),
    ("GET", "/api-docs/", 200),
    ("GET", "/openapi.json/", 200),
])
def test_trailing_slash_works_on_every_route(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict],
    method: str, path: str, status: int,
) -> None:
    flow = create()
    bodies = {"POST /flows/": flow_body(), "PATCH /flows/{id}/": {"name": "n"},
              "PATCH /flows/bulk/": [{"id": flow["id"], "name": "n"}]}
    response = client.open(path.format(id=flow["id"]), method=method, headers=auth(),
                           json=bodies.get(f"{method} {path}"))
    assert response.status_code == status, response.get_data(as_text=True)


def test_request_id_is_echoed(client: FlaskClient) -> None:
    response = client.get("/healthcheck", headers={"X-Request-Id": "req-42"})
    assert response.headers["X-Request-Id"] == "req-42"


def test_request_id_is_generated_when_absent(client: FlaskClient, auth: Headers) -> None:
    first = client.get("/healthcheck").headers["X-Request-Id"]
    second = client.get("/flows", headers=auth()).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_request_id_is_echoed_on_errors_too(client: FlaskClient) -> None:
    response = client.get("/flows", headers={"X-Request-Id": "req-err"})
    assert response.status_code == 401
    assert response.headers["X-Request-Id"] == "req-err"


# ----------------------------------------------------------------------------- CORS

UI = "https://ui.example"


@pytest.fixture
def cors_client(build_app) -> FlaskClient:
    return build_app(origin_whitelist=(UI,)).test_client()


def test_allowed_origin_gets_cors_headers(cors_client: FlaskClient, auth: Headers) -> None:
    response = cors_client.get("/flows", headers={**auth(), "Origin": UI})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == UI
    assert "ETag" in response.headers["Access-Control-Expose-Headers"]
    assert response.headers["Vary"] == "Origin"


def test_allowed_origin_preflight_is_204(cors_client: FlaskClient) -> None:
    response = cors_client.options("/flows/" + str(ObjectId()), headers={
        "Origin": UI, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, if-match"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == UI
    assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "if-match" in allowed


def test_unknown_origin_gets_no_cors_headers(cors_client: FlaskClient, auth: Headers) -> None:
    response = cors_client.get("/flows", headers={**auth(), "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


def test_unknown_origin_preflight_is_403(cors_client: FlaskClient, error_messages) -> None:
    response = cors_client.options("/flows", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert error_messages(response, 403) == ["Origin 'https://evil.example' is not allowed."]
    assert "Access-Control-Allow-Origin" not in response.headers


def test_no_whitelist_means_no_cors_headers(client: FlaskClient, auth: Headers) -> None:
    response = client.get("/flows", headers={**auth(), "Origin": UI})
    assert "Access-Control-Allow-Origin" not in response.headers


# ----------------------------------------------------------------------------- internal fields


def test_internal_fields_never_appear_in_responses(
    client: FlaskClient, auth: Headers, create: Create, flow_body: Callable[..., dict],
    start_flow, store: FlowStore,
) -> None:
    flow = create()
    start_flow(flow["id"])  # stores startedBy and queues an event
    store.claim_batch("relay-test", utcnow() + timedelta(minutes=1), 100)  # stores a lease
    raw = store.raw(ObjectId(flow["id"]))
    assert {"_id", "outbox", "startedBy", "statusRetries", "relayLeaseUntil"} <= set(raw)
    other = create(name="other")
    responses = [
        client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"],
        *client.get("/flows", headers=auth()).get_json()["data"],
        client.patch(f"/flows/{other['id']}", json={"name": "x"}, headers=auth())
        .get_json()["data"],
        client.post("/flows", json=[flow_body()], headers=auth()).get_json()["data"][0],
        client.patch("/flows/bulk", json=[{"id": other["id"]}], headers=auth())
        .get_json()["data"][0],
        other,
    ]
    for data in responses:
        assert set(data) == PUBLIC_FLOW_KEYS, sorted(data)
        for field in INTERNAL_FIELDS:
            assert field not in data
