"""The ownership rule: what a caller may add to or remove from a flow's owners (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from flow_repository.domain.ownership import owner_change_problems

Headers = Callable[..., dict[str, str]]

ME = {"id": "user-1", "type": "user"}
MY_TENANT = {"id": "tenant-1", "type": "tenant"}
CREATOR = {"id": "creator", "type": "user"}
COLLEAGUE = {"id": "colleague", "type": "user"}
OTHER_TENANT = {"id": "tenant-2", "type": "tenant"}

# Each way in that the default policy refuses, with the entry the 403 must name.
FORBIDDEN_ADDITIONS = {
    "another user": {"id": "someone-else", "type": "user"},
    "another tenant": OTHER_TENANT,
    "own tenant as a user": {"id": "tenant-1", "type": "user"},
    "self as a tenant": {"id": "user-1", "type": "tenant"},
}


def rule(requested, stored, **caller: Any) -> list[str]:
    who = {"sub": "user-1", "tenant": "tenant-1", "is_admin": False, **caller}
    return [problem.text() for problem in owner_change_problems(requested, stored, **who)]


# ----------------------------------------------------------------------------- the pure rule


def test_rule_lets_a_caller_add_itself_and_its_tenant_and_repeat_what_is_stored() -> None:
    assert rule([ME, MY_TENANT], []) == []
    assert rule([CREATOR, MY_TENANT], [CREATOR, MY_TENANT]) == []
    assert rule([MY_TENANT, CREATOR, ME], [CREATOR, MY_TENANT]) == []


@pytest.mark.parametrize("entry", FORBIDDEN_ADDITIONS.values(), ids=FORBIDDEN_ADDITIONS)
def test_rule_refuses_adding_anyone_else_naming_the_entry(entry: dict) -> None:
    problems = rule([CREATOR, MY_TENANT, entry], [CREATOR, MY_TENANT])
    assert len(problems) == 1
    assert problems[0].startswith("owners[2]: may not add owner")
    assert repr(entry["id"]) in problems[0]


def test_rule_lets_a_caller_remove_only_itself() -> None:
    assert rule([CREATOR, MY_TENANT], [CREATOR, MY_TENANT, ME]) == []
    for gone, kept in ((MY_TENANT, [CREATOR, ME]), (CREATOR, [MY_TENANT, ME])):
        problems = rule(kept, [CREATOR, MY_TENANT, ME])
        assert len(problems) == 1 and "may not remove owner" in problems[0]
        assert repr(gone["id"]) in problems[0]
    assert len(rule([], [CREATOR, MY_TENANT, ME])) == 2


def test_rule_leaves_admins_and_the_oih_policy_unrestricted() -> None:
    assert rule([OTHER_TENANT], [CREATOR, MY_TENANT], is_admin=True) == []
    assert rule([OTHER_TENANT], [CREATOR, MY_TENANT], policy="oih") == []


def test_rule_without_a_tenant_allows_only_the_caller() -> None:
    assert rule([ME], [], tenant=None) == []
    assert len(rule([MY_TENANT], [], tenant=None)) == 1


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture
def shared_flow(client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]) -> dict:
    """A flow of tenant-1 created by "creator"; user-1 (same tenant) sees it."""
    response = client.post("/flows", json=flow_body(), headers=auth("creator", "tenant-1"))
    assert response.status_code == 201
    return response.get_json()["data"]


def owners_of(client: FlaskClient, auth: Headers, flow_id: str) -> list[dict]:
    return client.get(f"/flows/{flow_id}", headers=auth("creator", "tenant-1")
                      ).get_json()["data"]["owners"]


def test_create_accepts_self_and_own_tenant(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    response = client.post("/flows", json=flow_body(owners=[MY_TENANT, ME]), headers=auth())
    assert response.status_code == 201
    assert response.get_json()["data"]["owners"] == [MY_TENANT, ME]


@pytest.mark.parametrize("entry", FORBIDDEN_ADDITIONS.values(), ids=FORBIDDEN_ADDITIONS)
def test_create_with_a_foreign_owner_is_403_naming_it(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict], error_messages,
    entry: dict,
) -> None:
    response = client.post("/flows", json=flow_body(owners=[ME, entry]), headers=auth())
    (message,) = error_messages(response, 403)
    assert message.startswith("owners[1]: may not add owner") and repr(entry["id"]) in message
    admin = auth("user-1", "tenant-1", ["all"])
    assert client.get("/flows", headers=admin).get_json()["meta"]["total"] == 0


def test_bulk_create_refuses_only_the_item_with_a_foreign_owner(
    client: FlaskClient, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    bodies = [flow_body(owners=[ME]), flow_body(owners=[OTHER_TENANT]), flow_body()]
    response = client.post("/flows", json=bodies, headers=auth())
    assert response.status_code == 201  # per item, aligned with the input, as in OIH
    items = response.get_json()["data"]
    assert ["errors" in item for item in items] == [False, True, False]
    (error,) = items[1]["errors"]
    assert error["code"] == 403 and "'tenant-2'" in error["message"]
    assert response.get_json()["meta"]["failed"] == 1


@pytest.mark.parametrize("entry", FORBIDDEN_ADDITIONS.values(), ids=FORBIDDEN_ADDITIONS)
def test_update_adding_a_foreign_owner_is_403_and_changes_nothing(
    client: FlaskClient, auth: Headers, shared_flow: dict, error_messages, entry: dict
) -> None:
    before = owners_of(client, auth, shared_flow["id"])
    response = client.patch(f"/flows/{shared_flow['id']}",
                            json={"owners": [*before, entry]}, headers=auth())
    (message,) = error_messages(response, 403)
    assert repr(entry["id"]) in message
    assert owners_of(client, auth, shared_flow["id"]) == before


@pytest.mark.parametrize("kept", [[], [CREATOR], [MY_TENANT], [ME]],
                         ids=["empty", "drop tenant", "drop creator", "drop both"])
def test_update_removing_the_tenant_or_another_owner_is_403(
    client: FlaskClient, auth: Headers, shared_flow: dict, error_messages, kept: list
) -> None:
    before = owners_of(client, auth, shared_flow["id"])
    response = client.patch(f"/flows/{shared_flow['id']}", json={"owners": kept},
                            headers=auth())
    messages = error_messages(response, 403)
    assert all("may not remove owner" in message for message in messages)
    assert owners_of(client, auth, shared_flow["id"]) == before
    # The creator still sees its flow (the finding was a 404 for its own flow).
    assert client.get(f"/flows/{shared_flow['id']}",
                      headers=auth("creator", None)).status_code == 200


def test_update_may_add_self_repeat_the_owners_and_remove_self(
    client: FlaskClient, auth: Headers, shared_flow: dict
) -> None:
    path = f"/flows/{shared_flow['id']}"
    stored = owners_of(client, auth, shared_flow["id"])
    assert client.patch(path, json={"owners": stored}, headers=auth()).status_code == 200
    added = client.patch(path, json={"owners": [*stored, ME]}, headers=auth())
    assert added.status_code == 200
    assert added.get_json()["data"]["owners"] == [CREATOR, MY_TENANT, ME]
    # Leaving is allowed; as in OIH the caller of a PATCH is kept among the owners.
    left = client.patch(path, json={"owners": [CREATOR, MY_TENANT]}, headers=auth())
    assert left.status_code == 200


def test_bulk_update_refuses_only_the_hijacking_item(
    client: FlaskClient, auth: Headers, shared_flow: dict, flow_body: Callable[..., dict]
) -> None:
    mine = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]
    items = [{"id": mine["id"], "owners": [*mine["owners"]], "name": "renamed"},
             {"id": shared_flow["id"], "owners": []}]
    response = client.patch("/flows/bulk", json=items, headers=auth())
    assert response.status_code == 200
    results = response.get_json()["data"]
    assert results[0]["name"] == "renamed" and "errors" not in results[0]
    assert all(error["code"] == 403 and "may not remove owner" in error["message"]
               for error in results[1]["errors"])
    assert owners_of(client, auth, shared_flow["id"]) == [CREATOR, MY_TENANT]


def test_admins_are_unrestricted(client: FlaskClient, auth: Headers, shared_flow: dict) -> None:
    admin = auth("root", None, ["all"])
    response = client.patch(f"/flows/{shared_flow['id']}", json={"owners": [OTHER_TENANT]},
                            headers=admin)
    assert response.status_code == 200
    assert response.get_json()["data"]["owners"] == [OTHER_TENANT, {"id": "root", "type": "user"}]


def test_oih_policy_restores_the_permissive_behaviour(
    build_app, auth: Headers, flow_body: Callable[..., dict]
) -> None:
    client = build_app(ownership_policy="oih").test_client()
    created = client.post("/flows", json=flow_body(owners=[OTHER_TENANT]), headers=auth())
    assert created.status_code == 201
    flow = created.get_json()["data"]
    assert OTHER_TENANT in flow["owners"]
    emptied = client.patch(f"/flows/{flow['id']}", json={"owners": []}, headers=auth())
    assert emptied.status_code == 200
    assert emptied.get_json()["data"]["owners"] == [ME]
