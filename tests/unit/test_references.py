"""Reference checks against fake component, secret and template services the tests start."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from flask.testing import FlaskClient

if TYPE_CHECKING:
    from tests.conftest import Exchange, FakeService

COMPONENT = "5ca5c44543c7f3001a0a7f9d"
OTHER_COMPONENT = "5ca5c44543c7f3001a0a7f9e"
SECRET = "5ca5c44543c7f3001a0a7f00"
TEMPLATE = "5ca5c44543c7f3001a0a7fff"
MISSING = "000000000000000000000bad"


class OihServices:
    """What the fake component, secret and template services know: the ids each bearer
    token may see. Anything else is 404, as OIH's services answer."""

    def __init__(self, http_service: Callable[..., FakeService]) -> None:
        self.visible: dict[str, set[str]] = {}  # bearer token -> ids it sees
        self.fake = http_service(self.answer)
        self.url = self.fake.url

    def answer(self, exchange: Exchange) -> tuple[int, Any]:
        token = exchange.headers.get("authorization", "").removeprefix("Bearer ")
        _, kind, reference = exchange.path.split("/")
        if kind in ("components", "secrets", "templates") and \
                reference in self.visible.get(token, set()):
            return 200, {"data": {"_id": reference}}
        return 404, {"errors": [{"message": "not found"}]}

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return [(call.path, call.headers.get("authorization")) for call in self.fake.calls]

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def services(http_service: Callable[..., FakeService]) -> OihServices:
    return OihServices(http_service)


@pytest.fixture
def checked(build_app, services: OihServices) -> FlaskClient:
    """An app that checks components, secrets and templates with the fake services."""
    return build_app(component_repository_url=services.url, secret_service_url=services.url,
                     template_repository_url=services.url + "/").test_client()


@pytest.fixture
def bearer(token: Callable[..., str]) -> str:
    return token()


def flow(component: str = COMPONENT, **extra: Any) -> dict[str, Any]:
    return {"name": "checked", "graph": {"nodes": [
        {"id": "crm", "componentId": COMPONENT, "function": "get"},
        {"id": "erp", "componentId": component, "function": "put", "credentials_id": SECRET}],
        "edges": [{"source": "crm", "target": "erp"}]}, **extra}


def test_existing_references_pass_and_are_asked_with_the_callers_token(
    checked: FlaskClient, services: OihServices, bearer: str
) -> None:
    services.visible[bearer] = {COMPONENT, OTHER_COMPONENT, SECRET, TEMPLATE}
    response = checked.post("/flows", json=flow(OTHER_COMPONENT, fromTemplate=TEMPLATE),
                            headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 201, response.get_json()
    assert sorted(services.paths()) == sorted([
        f"/components/{COMPONENT}", f"/components/{OTHER_COMPONENT}", f"/secrets/{SECRET}",
        f"/templates/{TEMPLATE}"])  # each id once, though COMPONENT is named twice
    assert {authorization for _, authorization in services.requests} == {f"Bearer {bearer}"}


def test_a_missing_reference_is_400_naming_the_node_and_the_id(
    checked: FlaskClient, services: OihServices, bearer: str, error_messages
) -> None:
    services.visible[bearer] = {COMPONENT, SECRET}
    response = checked.post("/flows", json=flow(MISSING, fromTemplate=TEMPLATE),
                            headers={"Authorization": f"Bearer {bearer}"})
    messages = error_messages(response, 400)
    assert messages == [
        (f"graph.nodes[1].componentId: component {MISSING} (node 'erp') does not exist or is "
        "not visible to you"),
        f"fromTemplate: template {TEMPLATE} does not exist or is not visible to you"]
    listed = checked.get("/flows", headers={"Authorization": f"Bearer {bearer}"})
    assert listed.get_json()["meta"]["total"] == 0


def test_a_reference_another_caller_cannot_see_is_missing_for_them(
    checked: FlaskClient, services: OihServices, token: Callable[..., str], error_messages
) -> None:
    mine, theirs = token("user-1"), token("user-2")
    services.visible[mine] = {COMPONENT, SECRET}
    created = checked.post("/flows", json=flow(), headers={"Authorization": f"Bearer {mine}"})
    assert created.status_code == 201
    refused = checked.post("/flows", json=flow(), headers={"Authorization": f"Bearer {theirs}"})
    error_messages(refused, 400)


def test_a_patch_checks_the_references_of_the_merged_flow(
    checked: FlaskClient, services: OihServices, bearer: str, error_messages
) -> None:
    services.visible[bearer] = {COMPONENT, SECRET}
    headers = {"Authorization": f"Bearer {bearer}"}
    flow_id = checked.post("/flows", json=flow(), headers=headers).get_json()["data"]["id"]
    refused = checked.patch(f"/flows/{flow_id}", json={"fromTemplate": MISSING},
                            headers=headers)
    assert MISSING in error_messages(refused, 400)[0]
    assert checked.get(f"/flows/{flow_id}", headers=headers).get_json()["data"].get(
        "fromTemplate") is None


def test_positive_answers_are_cached_briefly_and_negative_ones_not_at_all(
    checked: FlaskClient, services: OihServices, bearer: str
) -> None:
    headers = {"Authorization": f"Bearer {bearer}"}
    assert checked.post("/flows", json=flow(), headers=headers).status_code == 400
    services.visible[bearer] = {COMPONENT, SECRET}  # created in the meantime: found at once
    assert checked.post("/flows", json=flow(), headers=headers).status_code == 201
    asked = len(services.requests)
    assert checked.post("/flows", json=flow(), headers=headers).status_code == 201
    assert len(services.requests) == asked  # answered from the cache


def test_an_unreachable_service_is_503_for_a_change_and_a_warning_in_a_dry_run(
    build_app, bearer: str, error_messages, unused_port: int
) -> None:
    client = build_app(component_repository_url=f"http://127.0.0.1:{unused_port}",
                       reference_timeout_seconds=2.0).test_client()
    headers = {"Authorization": f"Bearer {bearer}"}
    messages = error_messages(client.post("/flows", json=flow(), headers=headers), 503)
    assert messages == [(f"cannot check references right now (service unreachable): "
                        f"component {COMPONENT}")]
    response = client.post("/flows/validate", json=flow(), headers=headers)
    assert response.status_code == 200
    meta = response.get_json()["meta"]
    assert meta["valid"] is True and meta["problems"] == []
    assert meta["warnings"] == messages
    assert response.get_json()["data"]["name"] == "checked"


def test_a_dry_run_reports_missing_references_as_problems(
    checked: FlaskClient, services: OihServices, bearer: str
) -> None:
    services.visible[bearer] = {COMPONENT}
    response = checked.post("/flows?dryRun=true", json=flow(),
                            headers={"Authorization": f"Bearer {bearer}"})
    meta = response.get_json()["meta"]
    assert response.status_code == 200 and meta["valid"] is False
    assert [(problem["code"], SECRET in problem["message"]) for problem in meta["problems"]] \
        == [(400, True)]


def test_without_service_urls_nothing_is_asked(client: FlaskClient, auth, services) -> None:
    assert client.post("/flows", json=flow(), headers=auth()).status_code == 201
    assert services.requests == []
