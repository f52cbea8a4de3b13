"""The requests OIH's own services and scripts send, against the service configured as OIH
configures it: INTROSPECT_TYPE=basic against an IAM that answers with account documents.

Each test names the OIH source (openintegrationhub/openintegrationhub) whose request it sends.
IAM and the logging service are real HTTP servers on 127.0.0.1, started by the tests.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient

from flow_repository.adapters.outbox import envelope
from flow_repository.adapters.store import FlowStore
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings

SERVICE_TOKEN = "flow-repository-service-token-5f1d"
COMPONENT = "5d9f1e2a3b4c5d6e7f800abc"
TENANT = "5d9f1e2a3b4c5d6e7f800001"


class Iam:
    """OIH's IAM: POST /api/v1/tokens/introspect answers the account document itself
    (services/iam/src/routes/tokens.js `res.send(accountData)`): no `sub`, `_id` instead."""

    def __init__(self, flow_permissions: tuple[str, ...]) -> None:
        self.flow_permissions = flow_permissions  # granted when a test names none
        self.accounts: dict[str, dict[str, Any]] = {}

    def account(self, permissions: tuple[str, ...] | list[str] | None = None,
                tenant: str | None = TENANT, **fields: Any) -> tuple[str, dict[str, str]]:
        """A new account and its token; returns (account id, Authorization headers)."""
        permissions = self.flow_permissions if permissions is None else permissions
        account_id = str(ObjectId())
        token = uuid.uuid4().hex
        self.accounts[token] = {
            "_id": account_id, "username": f"{account_id}@example.com", "firstname": "Jo",
            "status": "ACTIVE", "tenant": tenant, "roles": [], "permissions": list(permissions),
            "isAdmin": "all" in permissions, "confirmed": True, **fields,
        }
        return account_id, {"Authorization": f"Bearer {token}"}

    def answer(self, exchange: Any) -> tuple[Any, ...]:
        authorized = (exchange.headers.get("authorization") == f"Bearer {SERVICE_TOKEN}"
                      and exchange.headers.get("x-auth-type") == "basic")
        account = self.accounts.get((exchange.body or {}).get("token"))
        if not authorized:
            return 403, {"errors": [{"message": "MISSING_PERMISSION"}]}
        if account is None:
            return 404, "text/plain", b"Not Found"
        return 200, account


@pytest.fixture
def iam(settings: Settings) -> Iam:
    return Iam((settings.flow_read_permission, settings.flow_write_permission,
                settings.flow_control_permission, settings.flow_bulk_permission))


@pytest.fixture
def oih_settings(settings: Settings, iam: Iam, http_service) -> Settings:
    iam_server = http_service(iam.answer)
    return settings.replace(introspect_type="basic", iam_token=SERVICE_TOKEN,
                            introspect_endpoint_basic=f"{iam_server.url}/api/v1/tokens/introspect",
                            logging_service_timeout_seconds=0.5)


@pytest.fixture
def oih_app(oih_settings: Settings, store: FlowStore) -> Callable[..., Flask]:
    """oih_app(**setting_changes): the real app, configured as OIH configures it."""
    return lambda **changes: create_app(oih_settings.replace(**changes), store=store)


@pytest.fixture
def oih(oih_app: Callable[..., Flask]) -> FlaskClient:
    return oih_app().test_client()


def flow(name: str = "OIH flow", **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": "synced contacts", "graph": {
        "nodes": [{"id": "step_1", "componentId": COMPONENT, "function": "getPersons",
                   "name": "Source", "fields": {"interval": "minute"}},
                  {"id": "step_2", "componentId": COMPONENT, "function": "upsertPerson",
                   "name": "Target", "fields": {}}],
        "edges": [{"source": "step_1", "target": "step_2"}]}, **extra}


def created(client: FlaskClient, headers: dict[str, str], body: Any = None) -> dict[str, Any]:
    response = client.post("/flows", json=body or flow(), headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["data"]


# ----------------------------------------------------------------------------- identity


def test_an_iam_account_document_identifies_the_caller(oih: FlaskClient, iam: Iam) -> None:
    """lib/iam-utils/src/index.js: `user.sub = user.sub || body._id`; tenant from `tenant`."""
    account_id, headers = iam.account()
    response = oih.post("/flows", json=flow(), headers=headers)
    assert response.status_code == 201, response.get_json()
    data = response.get_json()["data"]
    assert data["owners"] == [{"id": account_id, "type": "user"}, {"id": TENANT, "type": "tenant"}]
    assert oih.get(f"/flows/{data['id']}", headers=headers).status_code == 200


def test_permissions_come_from_the_account_document(oih: FlaskClient, iam: Iam,
                                                    error_messages) -> None:
    _, reader = iam.account(permissions=["flows.read"])
    assert oih.get("/flows", headers=reader).status_code == 200
    assert error_messages(oih.post("/flows", json=flow(), headers=reader), 403) == [
        "MISSING_PERMISSION"]


def test_populated_roles_grant_their_permissions(oih: FlaskClient, iam: Iam) -> None:
    _, headers = iam.account(permissions=[], roles=[
        {"_id": str(ObjectId()), "name": "flow editor",
         "permissions": ["flows.read", "flows.write"]}])
    created(oih, headers)


def test_an_account_with_all_is_an_administrator(oih: FlaskClient, iam: Iam) -> None:
    _, owner = iam.account(tenant=None)
    mine = created(oih, owner)
    _, admin = iam.account(permissions=["all"], tenant=str(ObjectId()))
    assert oih.get(f"/flows/{mine['id']}", headers=admin).status_code == 200
    _, stranger = iam.account(tenant=str(ObjectId()))
    assert oih.get(f"/flows/{mine['id']}", headers=stranger).status_code == 404


def test_a_token_iam_does_not_know_is_401(oih: FlaskClient, error_messages) -> None:
    response = oih.get("/flows", headers={"Authorization": "Bearer unknown"})
    assert error_messages(response, 401) == ["Invalid token."]


# ----------------------------------------------------------------------------- bodies sent back


def test_web_ui_patches_back_the_flow_it_read(oih: FlaskClient, iam: Iam) -> None:
    """services/web-ui flow-teaser JSON editor and flow detail page: GET, edit, PATCH all."""
    _, headers = iam.account()
    read = oih.get(f"/flows/{created(oih, headers)['id']}", headers=headers).get_json()["data"]
    response = oih.patch(f"/flows/{read['id']}", json={**read, "name": "edited"},
                         headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"data": {**read, "name": "edited", "revision": 2,
                                            "updatedAt": response.get_json()["data"]["updatedAt"]},
                                   "meta": {}}


def test_dev_tools_setup_patches_with_status_inactive(oih: FlaskClient, iam: Iam) -> None:
    """dev-tools/docker-compose/src/setup/flows.js sends `status: 'inactive'` in its body."""
    _, headers = iam.account()
    flow_id = created(oih, headers, flow(status="inactive"))["id"]
    response = oih.patch(f"/flows/{flow_id}", json=flow("renamed", status="inactive"),
                         headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["data"]["status"] == "inactive"


def test_changing_the_status_by_patch_is_still_400(oih: FlaskClient, iam: Iam, store: FlowStore,
                                                  error_messages) -> None:
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    before = store.raw(ObjectId(flow_id))
    messages = error_messages(oih.patch(f"/flows/{flow_id}", json={"status": "active"},
                                        headers=headers), 400)
    assert messages == [("status: must be the flow's current status, inactive: use "
                        "/flows/{id}/start or /stop to change it (got 'active')")]
    assert store.raw(ObjectId(flow_id)) == before


def test_dispatcher_creates_a_placeholder_flow_then_patches_the_real_graph(
    oih: FlaskClient, iam: Iam
) -> None:
    """services/dispatcher-service/app/utils/flowCreator.js: POST a one-node placeholder,
    read `body.data.id`, PATCH the whole generated flow and expect 200."""
    _, headers = iam.account()
    generated = {"description": "This flow was automatically generated", "type": "ordinary",
                 "cron": "* * * * *", "name": "H&S Inbound CREATE Flow for Snazzy"}
    placeholder = {**generated, "graph": {"nodes": [
        {"id": "empty", "componentId": "5f895922926f72cf78353272", "function": "empty"}],
        "edges": []}}
    create = oih.post("/flows", json=placeholder, headers=headers)
    assert create.status_code == 201, create.get_json()
    flow_id = create.get_json()["data"]["id"]
    sdf = str(ObjectId())
    nodes = [
        {"id": "step_1", "componentId": sdf, "name": "SDF Adapter", "function": "receiveEvents",
         "description": "Receives data from SDF", "fields": {"amqpUrl": "amqp://x",
                                                             "flowId": flow_id}},
        {"id": "step_2", "componentId": COMPONENT, "credentials_id": str(ObjectId()),
         "name": "Snazzy Adapter", "function": "createObject", "description": "Pushes data"},
        {"id": "step_3", "componentId": sdf, "name": "SDF Adapter", "function": "processRecordUid",
         "description": "Updates recordUid", "fields": {"amqpUrl": "amqp://x",
                                                        "flowId": flow_id}},
    ]
    edges = [{"source": "step_1", "target": "step_2"}, {"source": "step_2", "target": "step_3"}]
    patched = oih.patch(f"/flows/{flow_id}", json={**generated, "graph": {
        "nodes": nodes, "edges": edges}}, headers=headers)
    assert patched.status_code == 200, patched.get_json()
    assert patched.get_json()["data"]["graph"] == {"nodes": nodes, "edges": edges}


def test_governance_dashboard_lists_with_a_plain_page_argument(oih: FlaskClient, iam: Iam) -> None:
    """services/governance-service/app/utils/dashboard.js: GET /flows?page=N (not page[number]);
    Express reads it as no page parameters at all, and so does this service."""
    _, headers = iam.account()
    created(oih, headers)
    response = oih.get("/flows?page=2", headers=headers)
    assert response.status_code == 200
    assert response.get_json()["meta"] == {"total": 1, "page": 1, "perPage": 10, "totalPages": 1}


# ----------------------------------------------------------------------------- unknown fields


def test_web_ui_privileged_node_flag_is_dropped_and_named(
    oih: FlaskClient, iam: Iam, caplog: pytest.LogCaptureFixture
) -> None:
    """The web UI's flow detail page adds `privileged` to every node it creates."""
    _, headers = iam.account()
    body = flow()
    for node in body["graph"]["nodes"]:
        node["privileged"] = False
    with caplog.at_level(logging.INFO, logger="flow_repository.services.flows"):
        response = oih.post("/flows", json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    answer = response.get_json()
    assert answer["meta"] == {"ignoredFields": ["graph.nodes[0].privileged",
                                                "graph.nodes[1].privileged"]}
    assert all("privileged" not in node for node in answer["data"]["graph"]["nodes"])
    [record] = [r for r in caplog.records if r.getMessage() == "unknown fields dropped"]
    assert record.ignoredFields == ["graph.nodes[0].privileged", "graph.nodes[1].privileged"]
    assert record.flowId == answer["data"]["id"]


def test_template_repository_node_authorization_is_dropped(oih: FlaskClient, iam: Iam) -> None:
    """services/template-repository merges a template node's `authorization` into the flow it
    POSTs, and answers 500 unless the flow repository answers 201."""
    _, headers = iam.account()
    body = flow(fromTemplate=str(ObjectId()))
    body["graph"]["nodes"][0]["authorization"] = {"authType": "OA2_AUTHORIZATION_CODE"}
    response = oih.post("/flows", json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["meta"]["ignoredFields"] == ["graph.nodes[0].authorization"]


def test_minikube_setup_mistyped_key_is_dropped(oih: FlaskClient, iam: Iam) -> None:
    """dev-tools/minikube/setup.sh POSTs `"description:"` under `set -e` and `curl --fail`."""
    _, headers = iam.account()
    body = {key: value for key, value in flow().items() if key != "description"}
    body["description:"] = "This flow takes actions at regular invervals"
    response = oih.post("/flows", json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["meta"] == {"ignoredFields": ["description:"]}


def test_unknown_fields_in_a_patch_are_dropped_and_named(oih: FlaskClient, iam: Iam) -> None:
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    response = oih.patch(f"/flows/{flow_id}", json={"name": "x", "owner": "me"}, headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"] == {"ignoredFields": ["owner"]}
    assert "owner" not in response.get_json()["data"]


def test_bulk_create_names_dropped_fields_by_item(oih: FlaskClient, iam: Iam) -> None:
    _, headers = iam.account()
    response = oih.post("/flows", json=[flow(), flow(color="red")], headers=headers)
    assert response.status_code == 201
    assert response.get_json()["meta"]["ignoredFields"] == ["[1].color"]


# ----------------------------------------------------------------------------- listing


@pytest.mark.parametrize(("size", "used"), [("1000", 1000), ("5000", 1000), ("7", 7)])
def test_load_test_page_size_is_served_and_clamped(
    oih: FlaskClient, iam: Iam, size: str, used: int
) -> None:
    """dev-tools/docker-compose/src/load-test.js lists with `page[size]=1000`."""
    _, headers = iam.account()
    response = oih.get(f"/flows?page[size]={size}", headers=headers)
    assert response.status_code == 200
    assert response.get_json()["meta"] == {"total": 0, "page": 1, "perPage": used,
                                           "totalPages": 0}


def test_max_page_size_is_configurable(oih_app: Callable[..., Flask], iam: Iam) -> None:
    _, headers = iam.account()
    client = oih_app(max_page_size=50).test_client()
    for _ in range(3):
        created(client, headers)
    body = client.get("/flows?page[size]=1000", headers=headers).get_json()
    assert body["meta"] == {"total": 3, "page": 1, "perPage": 50, "totalPages": 1}


def test_status_filter_takes_one_and_zero(oih: FlaskClient, iam: Iam) -> None:
    """services/flow-repository/app/api/controllers/flow.js: filter[status] 1 active, 0 inactive."""
    _, headers = iam.account()
    running, idle = created(oih, headers), created(oih, headers)
    oih.post(f"/flows/{running['id']}/start", headers=headers)
    oih_ids = {code: [item["id"] for item in oih.get(
        f"/flows?filter[status]={code}", headers=headers).get_json()["data"]]
        for code in ("0", "1", "starting")}
    assert oih_ids == {"0": [idle["id"]], "1": [], "starting": [running["id"]]}


# ----------------------------------------------------------------------------- response shapes


def test_start_and_stop_answer_data_and_empty_meta(oih: FlaskClient, iam: Iam) -> None:
    """startstop.js: `{data: {id, status}, meta: {}}`."""
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    start = oih.post(f"/flows/{flow_id}/start", headers=headers)
    assert (start.status_code, start.get_json()) == (
        200, {"data": {"id": flow_id, "status": "starting"}, "meta": {}})
    stop = oih.post(f"/flows/{flow_id}/stop", headers=headers)
    assert stop.get_json() == {"data": {"id": flow_id, "status": "stopping"}, "meta": {}}


def test_multiple_start_answers_a_bare_array_aligned_with_the_ids(
    oih: FlaskClient, iam: Iam, store: FlowStore
) -> None:
    """startstop.js POST /flows/multiple/start: 200, `[{data, meta}, {errors: [{message,
    flowId, code}]}]`; each id succeeds or fails on its own."""
    _, headers = iam.account()
    first, running = created(oih, headers)["id"], created(oih, headers)["id"]
    oih.post(f"/flows/{running}/start", headers=headers)
    missing = str(ObjectId())
    response = oih.post("/flows/multiple/start", json=[first, "nonsense", missing, running],
                        headers=headers)
    assert response.status_code == 200
    ok, bad, absent, busy = response.get_json()
    assert ok == {"data": {"id": first, "status": "starting"}, "meta": {}}
    assert bad == {"errors": [{"message": "invalid flow id 'nonsense': expected 24 "
                                          "hexadecimal digits", "flowId": "nonsense",
                               "code": 400}]}
    assert absent == {"errors": [{"message": f"flow {missing} not found", "flowId": missing,
                                  "code": 404}]}
    assert busy["errors"][0]["code"] == 409 and busy["errors"][0]["flowId"] == running
    assert store.raw(ObjectId(first))["status"] == "starting"


def test_multiple_stop_answers_the_same_shape(oih: FlaskClient, iam: Iam) -> None:
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    oih.post(f"/flows/{flow_id}/start", headers=headers)
    response = oih.post("/flows/multiple/stop", json=[flow_id, 7], headers=headers)
    assert response.status_code == 200
    stopped, junk = response.get_json()
    assert stopped == {"data": {"id": flow_id, "status": "stopping"}, "meta": {}}
    assert junk["errors"][0]["flowId"] == 7 and junk["errors"][0]["code"] == 400


def test_delete_answers_oih_message(oih: FlaskClient, iam: Iam) -> None:
    """flow.js DELETE: `res.status(200).send({ msg: 'Flow was successfully deleted' })`."""
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    response = oih.delete(f"/flows/{flow_id}", headers=headers)
    assert (response.status_code, response.get_json()) == (
        200, {"msg": "Flow was successfully deleted"})


# ----------------------------------------------------------------------------- step logs


LOG_LINES = {"data": [{"msg": "step ran", "level": 30}], "meta": {"page": 1}}


@pytest.fixture
def logging_service(http_service) -> Any:
    return http_service(lambda exchange: (200, LOG_LINES))


@pytest.fixture
def logs_app(oih_app: Callable[..., Flask], logging_service: Any) -> FlaskClient:
    return oih_app(logging_service_base_url=f"{logging_service.url}/base").test_client()


def test_step_logs_are_proxied_with_the_service_token(
    logs_app: FlaskClient, iam: Iam, logging_service: Any
) -> None:
    """flow.js GET /:id/steps/:stepId/logs: visibility first, then the logging service with
    `Bearer $IAM_TOKEN` and the caller's query string."""
    _, headers = iam.account()
    flow_id = created(logs_app, headers)["id"]
    response = logs_app.get(f"/flows/{flow_id}/steps/step_1/logs?page[size]=5&level=30",
                            headers=headers)
    assert (response.status_code, response.get_json()) == (200, LOG_LINES)
    [call] = logging_service.calls
    assert call.method == "GET"
    # The query string goes on exactly as it came (the test client escapes the brackets).
    assert call.path == f"/base/logs/flows/{flow_id}/steps/step_1?page%5Bsize%5D=5&level=30"
    assert call.headers["authorization"] == f"Bearer {SERVICE_TOKEN}"


def test_step_logs_of_an_invisible_flow_are_404_and_never_asked_for(
    logs_app: FlaskClient, iam: Iam, logging_service: Any, error_messages
) -> None:
    _, owner = iam.account(tenant=None)
    flow_id = created(logs_app, owner)["id"]
    _, stranger = iam.account(tenant=None)
    error_messages(logs_app.get(f"/flows/{flow_id}/steps/step_1/logs", headers=stranger), 404)
    error_messages(logs_app.get(f"/flows/{ObjectId()}/steps/step_1/logs", headers=owner), 404)
    error_messages(logs_app.get("/flows/nope/steps/step_1/logs", headers=owner), 400)
    error_messages(logs_app.get(f"/flows/{flow_id}/steps/step_1/logs"), 401)
    assert logging_service.calls == []


def test_step_ids_are_escaped_into_one_path_segment(
    logs_app: FlaskClient, iam: Iam, logging_service: Any, error_messages
) -> None:
    _, headers = iam.account()
    flow_id = created(logs_app, headers)["id"]
    assert logs_app.get(f"/flows/{flow_id}/steps/a%3Fb%23c/logs", headers=headers).status_code \
        == 200
    assert logging_service.calls[0].path == f"/base/logs/flows/{flow_id}/steps/a%3Fb%23c"
    error_messages(logs_app.get(f"/flows/{flow_id}/steps/%2E%2E/logs", headers=headers), 400)
    assert len(logging_service.calls) == 1


def test_step_logs_without_a_logging_service_are_501(
    oih: FlaskClient, iam: Iam, error_messages
) -> None:
    _, headers = iam.account()
    flow_id = created(oih, headers)["id"]
    assert error_messages(oih.get(f"/flows/{flow_id}/steps/step_1/logs", headers=headers),
                          501) == [("step logs are not available: this installation has no "
                                   "logging service (LOGGING_SERVICE_BASE_URL)")]


def test_step_logs_with_the_logging_service_down_are_502(
    oih_app: Callable[..., Flask], iam: Iam, error_messages, unused_port: int
) -> None:
    client = oih_app(logging_service_base_url=f"http://127.0.0.1:{unused_port}").test_client()
    _, headers = iam.account()
    flow_id = created(client, headers)["id"]
    assert error_messages(client.get(f"/flows/{flow_id}/steps/step_1/logs", headers=headers),
                          502) == ["the logging service is unavailable; retry later"]


def test_step_logs_from_a_slow_logging_service_are_504(
    logs_app: FlaskClient, iam: Iam, logging_service: Any, error_messages
) -> None:
    _, headers = iam.account()
    flow_id = created(logs_app, headers)["id"]
    logging_service.slow = True  # answers only after the test ends; the timeout is 0.5 s
    assert error_messages(logs_app.get(f"/flows/{flow_id}/steps/step_1/logs", headers=headers),
                          504) == ["the logging service did not answer in time; retry later"]


@pytest.mark.parametrize(("upstream", "status", "messages"), [
    ((500, {"errors": [{"message": "db down", "code": 500}]}), 500, ["db down"]),
    ((400, {"message": "bad page"}), 400, ["bad page"]),
    ((404, "text/html", b"<h1>Not Found</h1>"), 404,
     ["the logging service answered HTTP 404"]),
    ((401, {"message": "token invalid"}), 502,
     ["the logging service answered HTTP 401 to the flow repository"]),
    ((403, {"message": "MISSING_PERMISSION"}), 502,
     ["the logging service answered HTTP 403 to the flow repository"]),
    ((302, "text/plain", b""), 502,
     ["the logging service answered HTTP 302 to the flow repository"]),
])
def test_logging_service_errors_are_passed_on_as_json_errors(
    oih_app: Callable[..., Flask], iam: Iam, http_service, error_messages,
    upstream: tuple[Any, ...], status: int, messages: list[str],
) -> None:
    """Its status is kept, except that a refusal of the service's own token is 502: a 401
    would log OIH's web UI out."""
    service = http_service(lambda exchange: upstream)
    client = oih_app(logging_service_base_url=service.url).test_client()
    _, headers = iam.account()
    flow_id = created(client, headers)["id"]
    response = client.get(f"/flows/{flow_id}/steps/step_1/logs", headers=headers)
    assert error_messages(response, status) == messages


def test_the_iam_token_never_leaks_from_step_logs(
    oih_app: Callable[..., Flask], iam: Iam, http_service,
    caplog: pytest.LogCaptureFixture, unused_port: int,
) -> None:
    answers = []
    _, headers = iam.account()
    with caplog.at_level(logging.DEBUG):
        for status in (401, 500):  # a logging service that echoes the header it was sent
            echo = http_service(lambda exchange, status=status: (
                status, {"message": f"bad: {exchange.headers['authorization']}"}))
            client = oih_app(logging_service_base_url=echo.url).test_client()
            flow_id = created(client, headers)["id"]
            answers.append(client.get(f"/flows/{flow_id}/steps/step_1/logs", headers=headers))
        down = oih_app(logging_service_base_url=f"http://127.0.0.1:{unused_port}")
        answers.append(down.test_client().get(f"/flows/{flow_id}/steps/step_1/logs",
                                              headers=headers))
    assert answers[1].get_json()["errors"][0]["message"] == "bad: Bearer [redacted]"
    for answer in answers:
        assert SERVICE_TOKEN not in answer.get_data(as_text=True)
        assert SERVICE_TOKEN not in str(answer.headers)
    assert SERVICE_TOKEN not in caplog.text
    assert all(SERVICE_TOKEN not in str(vars(record)) for record in caplog.records)


# ----------------------------------------------------------------------------- events


# What OIH's event consumers read of each event the flow repository publishes:
# services/component-orchestrator/src/event-handlers/FlowStarting.js and models/Flow.js
# (the payload is assigned onto its Flow: id, graph, status, startedBy), the scheduler's
# FlowStarting handler (id, cron, graph), webhooks (id, graph), and the audit log
# (headers name/serviceName/createdAt, payload tenant/user/flowId).
FLOW_EVENT_FIELDS = {"id", "graph", "status", "cron", "owners", "name", "flowSettings"}
NODE_FIELDS = {"id", "componentId", "function", "fields", "nodeSettings", "credentials_id"}
EDGE_FIELDS = {"source", "target", "config"}


def test_events_keep_every_field_oih_consumers_read(
    oih: FlaskClient, iam: Iam, store: FlowStore
) -> None:
    account_id, headers = iam.account()
    body = flow(cron="*/5 * * * *", flowSettings={"retries": 2})
    body["graph"]["nodes"][0].update(nodeSettings={"idempotent": True},
                                     credentials_id=str(ObjectId()), privileged=True)
    body["graph"]["edges"][0]["config"] = {"condition": "true", "mapper": {"a": "$.b"}}
    flow_id = created(oih, headers, body)["id"]
    assert oih.patch(f"/flows/{flow_id}", json={"name": "x"}, headers=headers).status_code == 200
    for step in ("start", "stop"):
        assert oih.post(f"/flows/{flow_id}/{step}", headers=headers).status_code == 200
    raw = store.raw(ObjectId(flow_id))
    messages = {event["name"]: envelope(event, raw) for event in raw["outbox"]}
    assert set(messages) >= {"flowrepo.flow.created", "flowrepo.flow.modified", "flow.starting",
                             "flow.stopping"}

    for name in ("flow.starting", "flow.stopping"):
        payload = messages[name]["payload"]
        assert FLOW_EVENT_FIELDS <= set(payload), (name, sorted(payload))
        assert payload["id"] == flow_id and payload["cron"] == "*/5 * * * *"
        node, _ = payload["graph"]["nodes"]
        assert NODE_FIELDS <= set(node) and "privileged" not in node
        [edge] = payload["graph"]["edges"]
        assert EDGE_FIELDS <= set(edge) and edge["config"]["mapper"] == {"a": "$.b"}
    assert messages["flow.starting"]["payload"]["status"] == "starting"
    assert messages["flow.starting"]["payload"]["startedBy"] == account_id
    assert messages["flow.stopping"]["payload"]["status"] == "stopping"

    for name in ("flowrepo.flow.created", "flowrepo.flow.modified"):
        audit = messages[name]
        assert audit["payload"] == {"tenant": TENANT, "user": account_id, "flowId": flow_id}
        assert {"name", "serviceName", "createdAt"} <= set(audit["headers"])
        assert audit["headers"]["serviceName"] == "flow-repository"
