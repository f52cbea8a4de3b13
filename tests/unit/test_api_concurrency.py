"""Revisions, ETag/If-Match and status preconditions: changes are atomic, never read-check-write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient

from flow_repository.adapters.store import FlowStore, utcnow
from flow_repository.domain import flow as domain
from flow_repository.services.entries import definition_entry, status_entry

Headers = Callable[..., dict[str, str]]
# What another request's write records in history (every write records one entry).
ELSEWHERE = definition_entry("someone-else", "updated", {})
STARTED_ELSEWHERE = status_entry(domain.START, "inactive", utcnow(), "someone-else")
Create = Callable[..., dict[str, Any]]


def fetch(client: FlaskClient, auth: Headers, flow_id: str) -> dict[str, Any]:
    response = client.get(f"/flows/{flow_id}", headers=auth())
    assert response.status_code == 200
    return response.get_json()["data"]


def move_to(app: Flask, client: FlaskClient, auth: Headers, flow_id: str, status: str) -> None:
    """Drive a flow through the lifecycle (API commands plus orchestrator reports)."""
    service = app.extensions["flow_repository"].service
    steps = {
        "starting": [("api", "start")],
        "active": [("api", "start"), ("event", "flow.started")],
        "stopping": [("api", "start"), ("event", "flow.started"), ("api", "stop")],
    }[status]
    for kind, name in steps:
        if kind == "api":
            assert client.post(f"/flows/{flow_id}/{name}", headers=auth()).status_code == 200
        else:
            service.apply_status_event(name, {"id": flow_id})
    assert fetch(client, auth, flow_id)["status"] == status


@pytest.fixture
def race(monkeypatch: pytest.MonkeyPatch, store: FlowStore) -> Callable[..., list[ObjectId]]:
    """race(change): run ``change(original_update)`` just before the store's first update.

    It stands for another request whose write lands between this request's read and its
    own write. Returns the list of flow ids the patched update was called with.
    """

    def arm(change: Callable[[Callable[..., Any]], None]) -> list[ObjectId]:
        backend = type(store)
        original = backend.update
        calls: list[ObjectId] = []

        def update(self: FlowStore, flow_id: ObjectId, **kwargs: Any) -> Any:
            calls.append(flow_id)
            if len(calls) == 1:
                change(lambda *args, **kw: original(self, *args, **kw))
            return original(self, flow_id, **kwargs)

        monkeypatch.setattr(backend, "update", update)
        return calls

    return arm


# ----------------------------------------------------------------------------- revisions


def test_each_change_increments_the_revision_and_etag(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    path = f"/flows/{flow['id']}"
    assert client.get(path, headers=auth()).headers["ETag"] == '"1"'
    for expected in (2, 3):
        response = client.patch(path, json={"name": f"v{expected}"}, headers=auth())
        assert response.headers["ETag"] == f'"{expected}"'
        assert response.get_json()["data"]["revision"] == expected
    client.post(f"{path}/start", headers=auth())
    response = client.get(path, headers=auth())
    assert response.headers["ETag"] == '"4"'
    assert response.get_json()["data"]["revision"] == 4


# ----------------------------------------------------------------------------- If-Match on PATCH


@pytest.mark.parametrize("if_match", ['"1"', "*", '"7", "1"', ' "1" '])
def test_patch_with_a_matching_if_match_succeeds(
    client: FlaskClient, auth: Headers, create: Create, if_match: str
) -> None:
    flow = create()
    response = client.patch(f"/flows/{flow['id']}", json={"name": "new"},
                            headers={**auth(), "If-Match": if_match})
    assert response.status_code == 200
    assert fetch(client, auth, flow["id"])["name"] == "new"


@pytest.mark.parametrize("if_match", [
    '"2"', '"0"', "garbage", '""', '"1.0"', 'W/"1"', "1", '"\u00b2"', '"\u0661"', '"\uff11"',
    '"' + "1" * 5000 + '"', '"1', '1"', '"-1"', '"+1"', '" 1"', "**", ",", '"1"x'])
def test_patch_with_a_stale_or_garbage_if_match_is_412_and_changes_nothing(
    client: FlaskClient, auth: Headers, create: Create, error_messages, store: FlowStore,
    if_match: str,
) -> None:
    flow = create()
    before = store.raw(ObjectId(flow["id"]))
    response = client.patch(f"/flows/{flow['id']}", json={"name": "new"},
                            headers={**auth(), "If-Match": if_match})
    error_messages(response, 412)
    assert store.raw(ObjectId(flow["id"])) == before


def test_patch_with_a_stale_etag_after_another_change_is_412(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    etag = client.get(f"/flows/{flow['id']}", headers=auth()).headers["ETag"]
    client.patch(f"/flows/{flow['id']}", json={"name": "first"}, headers=auth())
    response = client.patch(f"/flows/{flow['id']}", json={"name": "second"},
                            headers={**auth(), "If-Match": etag})
    assert error_messages(response, 412) == [
        f"flow {flow['id']} is at revision 2, not 1"
    ]
    assert fetch(client, auth, flow["id"])["name"] == "first"


def test_patch_without_if_match_ignores_revisions(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    client.patch(f"/flows/{flow['id']}", json={"name": "first"}, headers=auth())
    response = client.patch(f"/flows/{flow['id']}", json={"name": "second"}, headers=auth())
    assert response.status_code == 200
    assert response.get_json()["data"]["revision"] == 3


# ----------------------------------------------------------------------------- If-Match on DELETE


@pytest.mark.parametrize("if_match", ['"1"', "*"])
def test_delete_with_a_matching_if_match_deletes(
    client: FlaskClient, auth: Headers, create: Create, error_messages, if_match: str
) -> None:
    flow = create()
    response = client.delete(f"/flows/{flow['id']}", headers={**auth(), "If-Match": if_match})
    assert response.status_code == 200
    error_messages(client.get(f"/flows/{flow['id']}", headers=auth()), 404)


@pytest.mark.parametrize("if_match", ['"3"', "garbage", '"\u00b2"'])
def test_delete_with_a_stale_or_garbage_if_match_is_412_and_keeps_the_flow(
    client: FlaskClient, auth: Headers, create: Create, error_messages, if_match: str
) -> None:
    flow = create()
    response = client.delete(f"/flows/{flow['id']}", headers={**auth(), "If-Match": if_match})
    error_messages(response, 412)
    assert fetch(client, auth, flow["id"]) == flow


def test_delete_of_a_stranger_flow_with_if_match_is_404(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    response = client.delete(f"/flows/{flow['id']}",
                             headers={**auth("stranger", "t-2"), "If-Match": '"1"'})
    error_messages(response, 404)
    assert fetch(client, auth, flow["id"]) == flow


# ----------------------------------------------------------------------------- status preconditions


@pytest.mark.parametrize("status", ["starting", "active", "stopping"])
def test_patch_and_delete_are_409_unless_inactive(
    app: Flask, client: FlaskClient, auth: Headers, create: Create, error_messages,
    store: FlowStore, status: str,
) -> None:
    flow = create()
    move_to(app, client, auth, flow["id"], status)
    before = store.raw(ObjectId(flow["id"]))
    path = f"/flows/{flow['id']}"
    assert error_messages(client.patch(path, json={"name": "x"}, headers=auth()), 409) == [
        f"flow {flow['id']} cannot be updated while its status is {status}; only an inactive flow can be updated"
    ]
    assert error_messages(client.delete(path, headers=auth()), 409) == [
        f"flow {flow['id']} cannot be deleted while its status is {status}; only an inactive flow can be deleted"
    ]
    assert store.raw(ObjectId(flow["id"])) == before


def test_a_stopped_flow_can_be_changed_again(
    app: Flask, client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create()
    move_to(app, client, auth, flow["id"], "stopping")
    app.extensions["flow_repository"].service.apply_status_event("flow.stopped",
                                                                 {"id": flow["id"]})
    path = f"/flows/{flow['id']}"
    assert client.patch(path, json={"name": "again"}, headers=auth()).status_code == 200
    assert client.delete(path, headers=auth()).status_code == 200


# ----------------------------------------------------------------------------- races


def test_patch_with_if_match_loses_to_a_concurrent_write_with_412(
    client: FlaskClient, auth: Headers, create: Create, error_messages, race
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    race(lambda update: update(oid, changes={"description": "written elsewhere"}, history=ELSEWHERE))
    response = client.patch(f"/flows/{flow['id']}", json={"name": "mine"},
                            headers={**auth(), "If-Match": '"1"'})
    assert error_messages(response, 412) == [f"flow {flow['id']} is at revision 2, not 1"]
    stored = fetch(client, auth, flow["id"])
    assert (stored["name"], stored["description"], stored["revision"]) == (
        flow["name"], "written elsewhere", 2)


def test_patch_without_if_match_retries_and_keeps_the_concurrent_write(
    client: FlaskClient, auth: Headers, create: Create, race
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    calls = race(lambda update: update(oid, changes={"description": "written elsewhere"}, history=ELSEWHERE))
    response = client.patch(f"/flows/{flow['id']}", json={"name": "mine"}, headers=auth())
    assert response.status_code == 200
    assert len(calls) == 2  # the first write found revision 2 and was retried
    stored = fetch(client, auth, flow["id"])
    assert (stored["name"], stored["description"], stored["revision"]) == (
        "mine", "written elsewhere", 3)
    assert response.get_json()["data"] == stored


def test_patch_racing_a_start_is_409_and_the_flow_keeps_running(
    client: FlaskClient, auth: Headers, create: Create, error_messages, race
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    race(lambda update: update(oid, statuses=("inactive",), changes={"status": "starting"},
                                       history=STARTED_ELSEWHERE))
    response = client.patch(f"/flows/{flow['id']}", json={"name": "mine"}, headers=auth())
    error_messages(response, 409)
    stored = fetch(client, auth, flow["id"])
    assert (stored["name"], stored["status"]) == (flow["name"], "starting")


def test_delete_racing_a_start_is_409_and_the_flow_survives(
    client: FlaskClient, auth: Headers, create: Create, error_messages, race,
    store: FlowStore,
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    race(lambda update: update(oid, statuses=("inactive",), changes={"status": "starting"},
                                       history=STARTED_ELSEWHERE))
    response = client.delete(f"/flows/{flow['id']}", headers=auth())
    assert error_messages(response, 409) == [
        f"flow {flow['id']} cannot be deleted while its status is starting; only an inactive flow can be deleted"
    ]
    assert fetch(client, auth, flow["id"])["status"] == "starting"
    assert store.raw(ObjectId(flow["id"])).get("deletedAt") is None


def test_delete_with_if_match_racing_a_patch_is_412(
    client: FlaskClient, auth: Headers, create: Create, error_messages, race
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    race(lambda update: update(oid, changes={"name": "renamed elsewhere"}, history=ELSEWHERE))
    response = client.delete(f"/flows/{flow['id']}", headers={**auth(), "If-Match": '"1"'})
    error_messages(response, 412)
    assert fetch(client, auth, flow["id"])["name"] == "renamed elsewhere"


def test_patch_that_never_wins_the_race_gives_up_with_409(
    client: FlaskClient, auth: Headers, create: Create, error_messages,
    monkeypatch: pytest.MonkeyPatch, store: FlowStore,
) -> None:
    flow = create()
    oid = ObjectId(flow["id"])
    backend = type(store)
    original = backend.update
    calls: list[int] = []

    def always_beaten(self: FlowStore, flow_id: ObjectId, **kwargs: Any) -> Any:
        calls.append(1)
        original(self, oid, changes={"description": f"elsewhere {len(calls)}"},
                 history=ELSEWHERE)
        return original(self, flow_id, **kwargs)

    monkeypatch.setattr(backend, "update", always_beaten)
    response = client.patch(f"/flows/{flow['id']}", json={"name": "mine"}, headers=auth())
    assert error_messages(response, 409) == [
        f"flow {flow['id']} keeps changing; retry the update"]
    assert len(calls) == 5
    monkeypatch.undo()
    assert fetch(client, auth, flow["id"])["name"] == flow["name"]
