"""Flow history through the API: revisions, one revision, diffs, restore, retention, GDPR."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import jsonpatch
import pytest
from bson import ObjectId
from flask.testing import FlaskClient

from flow_repository.adapters.store import FlowStore, StoreUnavailable, utcnow

Headers = Callable[..., dict[str, str]]
Create = Callable[..., dict[str, Any]]


def revisions(client: FlaskClient, headers: dict[str, str], flow_id: str,
              query: str = "") -> dict[str, Any]:
    response = client.get(f"/flows/{flow_id}/revisions{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def patch(client: FlaskClient, headers: dict[str, str], flow_id: str, body: dict,
          status: int = 200) -> dict[str, Any]:
    response = client.patch(f"/flows/{flow_id}", json=body, headers=headers)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def definition(flow: dict[str, Any]) -> dict[str, Any]:
    """What a definition entry keeps of a flow as the API returns it."""
    fields = ("name", "description", "type", "graph", "owners", "cron", "fromTemplate",
              "flowSettings", "tenant")
    return {key: flow[key] for key in fields if flow.get(key) is not None}


def unavailable(*arguments: Any) -> None:
    """Stands for MongoDB failing the history write (the change itself was applied)."""
    raise StoreUnavailable(ConnectionError("gone"))


# ----------------------------------------------------------------------------- recording


def test_every_definition_change_keeps_the_whole_flow_author_time_and_revision(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    created = create()
    first = patch(client, auth(), created["id"], {"name": "renamed"})["data"]
    second = patch(client, auth(), created["id"], {"cron": "0 * * * *"})["data"]

    body = revisions(client, auth(), created["id"])
    assert body["meta"] == {"total": 3, "page": 1, "perPage": 10, "totalPages": 1}
    entries = body["data"]
    assert [entry["revision"] for entry in entries] == [3, 2, 1]  # newest first
    assert [entry["change"] for entry in entries] == ["updated", "updated", "created"]
    assert all(entry["kind"] == "definition" and entry["sub"] == "user-1" for entry in entries)
    for entry, flow in zip(entries, (second, first, created), strict=True):
        assert entry["at"] == flow["updatedAt"]
        kept = {key: value for key, value in entry["flow"].items()
                if key not in ("id", "revision")}
        assert kept == definition(flow)
        assert (entry["flow"]["id"], entry["flow"]["revision"]) == (created["id"],
                                                                   flow["revision"])


def test_bulk_patch_records_each_changed_flow(client: FlaskClient, auth: Headers,
                                              create: Create) -> None:
    flows = [create(name=f"flow {i}") for i in range(2)]
    response = client.patch("/flows/bulk", headers=auth(), json=[
        {"id": flows[0]["id"], "name": "bulk 0"}, {"id": flows[1]["id"], "status": "active"}])
    assert response.status_code == 200  # OIH answers 200, per item
    assert revisions(client, auth(), flows[0]["id"])["data"][0]["flow"]["name"] == "bulk 0"
    assert revisions(client, auth(), flows[1]["id"])["meta"]["total"] == 1  # refused: none


def test_status_changes_are_status_entries_without_a_copy_of_the_flow(
    app, client: FlaskClient, auth: Headers, create: Create, start_flow
) -> None:
    flow = create()
    start_flow(flow["id"])
    service = app.extensions["flow_repository"].service
    service.apply_status_event("flow.started", {"id": flow["id"]})
    assert client.post(f"/flows/{flow['id']}/stop", headers=auth()).status_code == 200
    service.apply_status_event("flow.stopped", {"id": flow["id"]})
    service.apply_status_event("flow.stopped", {"id": flow["id"]})  # duplicate: ignored

    entries = revisions(client, auth(), flow["id"])["data"]
    assert [entry["revision"] for entry in entries] == [5, 4, 3, 2, 1]
    statuses = [entry for entry in entries if entry["kind"] == "status"]
    assert [(e["status"]["from"], e["status"]["to"], e["sub"]) for e in statuses] == [
        ("stopping", "inactive", None), ("active", "stopping", "user-1"),
        ("starting", "active", None), ("inactive", "starting", "user-1")]
    assert statuses[-1]["status"]["reason"] == "start requested"
    assert all("flow" not in entry for entry in statuses)


def test_a_refused_change_leaves_no_entry(client: FlaskClient, auth: Headers, create: Create,
                                          start_flow) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"graph": {"nodes": []}}, status=400)
    response = client.patch(f"/flows/{flow['id']}", json={"name": "x"},
                            headers={**auth(), "If-Match": '"7"'})
    assert response.status_code == 412
    start_flow(flow["id"])
    patch(client, auth(), flow["id"], {"name": "while starting"}, status=409)
    assert client.post(f"/flows/{flow['id']}/start", headers=auth()).status_code == 409
    assert [entry["revision"] for entry in revisions(client, auth(), flow["id"])["data"]] == [
        2, 1]


def test_an_entry_whose_write_failed_is_recorded_on_the_next_read(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The change is applied; the history write after it fails (MongoDB went away, or the
    process died): the entry waits in the flow document and the next read records it."""
    if store.history_with_change:
        pytest.skip("the entry is written in the change's transaction: see test_store_sqlite")
    flow = create()
    record = store.record_history
    monkeypatch.setattr(store, "record_history", unavailable)
    changed = patch(client, auth(), flow["id"], {"name": "applied"})["data"]
    assert changed["revision"] == 2
    pending = store.raw(ObjectId(flow["id"]))["historyOutbox"]
    assert [entry["flow"]["name"] for entry in pending] == ["applied"]

    monkeypatch.setattr(store, "record_history", record)
    entries = revisions(client, auth(), flow["id"])["data"]
    assert [(entry["revision"], entry["flow"]["name"]) for entry in entries] == [
        (2, "applied"), (1, flow["name"])]
    assert store.raw(ObjectId(flow["id"]))["historyOutbox"] == []


def test_pending_entries_get_the_revisions_of_their_changes(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore,
    monkeypatch: pytest.MonkeyPatch, start_flow,
) -> None:
    flow = create()
    monkeypatch.setattr(store, "drop_pending_history", lambda flow_id, entry_ids: None)
    monkeypatch.setattr(store, "record_history", lambda flows, entries: None)
    patch(client, auth(), flow["id"], {"name": "two"})
    patch(client, auth(), flow["id"], {"name": "three"})
    start_flow(flow["id"])
    monkeypatch.undo()
    entries = revisions(client, auth(), flow["id"])["data"]
    assert [(e["revision"], e["kind"], e.get("flow", {}).get("name")) for e in entries] == [
        (4, "status", None), (3, "definition", "three"), (2, "definition", "two"),
        (1, "definition", flow["name"])]


# ----------------------------------------------------------------------------- reading


def test_revisions_are_paged_newest_first(client: FlaskClient, auth: Headers,
                                          create: Create) -> None:
    flow = create()
    for index in range(4):
        patch(client, auth(), flow["id"], {"description": f"edit {index}"})
    body = revisions(client, auth(), flow["id"], "?page[size]=2&page[number]=2")
    assert [entry["revision"] for entry in body["data"]] == [3, 2]
    assert body["meta"] == {"total": 5, "page": 2, "perPage": 2, "totalPages": 3}
    response = client.get(f"/flows/{flow['id']}/revisions?page[size]=0", headers=auth())
    assert response.status_code == 400


def test_one_revision_is_the_flow_as_it_was(client: FlaskClient, auth: Headers,
                                            create: Create, start_flow) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"name": "later"})
    start_flow(flow["id"])
    response = client.get(f"/flows/{flow['id']}/revisions/1", headers=auth())
    assert response.status_code == 200
    entry = response.get_json()["data"]
    assert entry["revision"] == 1 and entry["change"] == "created"
    assert entry["flow"]["name"] == flow["name"]
    status = client.get(f"/flows/{flow['id']}/revisions/3", headers=auth()).get_json()["data"]
    assert status["kind"] == "status" and status["status"]["to"] == "starting"
    assert status["flow"]["name"] == "later"  # the definition in force at revision 3
    assert status["flow"]["revision"] == 2


@pytest.mark.parametrize(("path", "status"), [
    ("/revisions/9", 404), ("/revisions/0", 400), ("/revisions/x", 400),
    ("/diff?from=9", 404), ("/diff?from=1&to=9", 404), ("/diff", 400), ("/diff?from=x", 400),
])
def test_revisions_that_do_not_exist_or_are_malformed(
    client: FlaskClient, auth: Headers, create: Create, error_messages, path: str, status: int
) -> None:
    flow = create()
    error_messages(client.get(f"/flows/{flow['id']}{path}", headers=auth()), status)


def test_history_has_the_visibility_of_the_flow(client: FlaskClient, auth: Headers,
                                                create: Create, error_messages) -> None:
    flow = create()
    stranger = auth("user-2", "tenant-2")
    for path in ("/revisions", "/revisions/1", "/diff?from=1"):
        error_messages(client.get(f"/flows/{flow['id']}{path}", headers=stranger), 404)
    error_messages(client.post(f"/flows/{flow['id']}/restore", json={"revision": 1},
                               headers=stranger), 404)
    colleague = auth("user-3", "tenant-1")
    assert revisions(client, colleague, flow["id"])["meta"]["total"] == 1
    admin = auth("admin", None, permissions=("all",))
    assert revisions(client, admin, flow["id"])["meta"]["total"] == 1
    no_read = auth(permissions=("flows.write",))
    assert error_messages(client.get(f"/flows/{flow['id']}/revisions", headers=no_read),
                          403) == ["MISSING_PERMISSION"]
    error_messages(client.get(f"/flows/{flow['id']}/revisions"), 401)


# ----------------------------------------------------------------------------- diff


def test_diff_is_a_json_patch_from_one_revision_to_another(
    client: FlaskClient, auth: Headers, create: Create
) -> None:
    flow = create(nodes=2)
    patch(client, auth(), flow["id"], {"name": "two", "cron": "*/5 * * * *"})
    graph = copy.deepcopy(flow["graph"])
    graph["nodes"][1]["fields"] = {"key": "changed"}
    current = patch(client, auth(), flow["id"], {"graph": graph})["data"]

    response = client.get(f"/flows/{flow['id']}/diff?from=1&to=2", headers=auth())
    assert response.status_code == 200
    body = response.get_json()["data"]
    assert (body["from"], body["to"]) == (1, 2)
    assert sorted((op["op"], op["path"]) for op in body["patch"]) == [
        ("add", "/cron"), ("replace", "/name")]

    latest = client.get(f"/flows/{flow['id']}/diff?from=1", headers=auth()).get_json()["data"]
    assert latest["to"] == 3  # the current revision
    assert jsonpatch.apply_patch(definition(flow), latest["patch"]) == definition(current)
    backwards = client.get(f"/flows/{flow['id']}/diff?from=3&to=1", headers=auth())
    assert jsonpatch.apply_patch(definition(current), backwards.get_json()["data"]["patch"]) \
        == definition(flow)
    same = client.get(f"/flows/{flow['id']}/diff?from=3", headers=auth()).get_json()["data"]
    assert same["patch"] == []


# ----------------------------------------------------------------------------- restore


def test_restore_makes_an_old_revision_current_as_a_new_revision(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore
) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"name": "bad edit", "cron": "0 * * * *",
                                       "graph": {"nodes": [flow["graph"]["nodes"][0]]}})
    outbox_before = len(store.raw(ObjectId(flow["id"]))["outbox"])
    response = client.post(f"/flows/{flow['id']}/restore", json={"revision": 1},
                           headers={**auth(), "If-Match": '"2"'})
    assert response.status_code == 200, response.get_json()
    assert response.headers["ETag"] == '"3"'
    restored = response.get_json()["data"]
    assert restored["revision"] == 3
    assert definition(restored) == definition(flow)
    assert restored["cron"] is None
    outbox = store.raw(ObjectId(flow["id"]))["outbox"]
    assert len(outbox) == outbox_before + 1
    assert outbox[-1]["name"] == "flowrepo.flow.modified"
    assert outbox[-1]["payload"] == {"tenant": "tenant-1", "user": "user-1",
                                     "flowId": flow["id"]}
    entry = revisions(client, auth(), flow["id"])["data"][0]
    assert (entry["revision"], entry["change"], entry["restoredFrom"]) == (3, "restored", 1)
    diff = client.get(f"/flows/{flow['id']}/diff?from=1", headers=auth()).get_json()
    assert diff["data"]["patch"] == []


def test_restore_keeps_the_current_owners(client: FlaskClient, auth: Headers,
                                          create: Create) -> None:
    flow = create()
    owners = [*flow["owners"], {"id": "user-9", "type": "user"}]
    patch(client, auth("user-1", "tenant-1", ["all"]), flow["id"], {"owners": owners})
    restored = client.post(f"/flows/{flow['id']}/restore", json={"revision": 1},
                           headers=auth()).get_json()["data"]
    assert restored["owners"] == owners


def test_restore_runs_the_checks_of_a_change(client: FlaskClient, auth: Headers,
                                             create: Create, error_messages,
                                             start_flow) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"name": "two"})
    url = f"/flows/{flow['id']}/restore"
    assert error_messages(client.post(url, json={"revision": 1},
                                      headers=auth(permissions=("flows.read",))),
                          403) == ["MISSING_PERMISSION"]
    error_messages(client.post(url, json={"revision": 1},
                               headers={**auth(), "If-Match": '"1"'}), 412)
    error_messages(client.post(url, json={"revision": 5}, headers=auth()), 404)
    for body in ({"revision": "1"}, {"revision": 0}, {}, [1], {"revision": 1, "x": 2}):
        error_messages(client.post(url, json=body, headers=auth()), 400)
    start_flow(flow["id"])
    error_messages(client.post(url, json={"revision": 1}, headers=auth()), 409)
    assert revisions(client, auth(), flow["id"])["meta"]["total"] == 3  # no restore entry


# ----------------------------------------------------------------------------- retention


def test_history_keeps_the_newest_max_revisions(build_app, auth: Headers, flow_body) -> None:
    client = build_app(history_max_revisions=3).test_client()
    flow_id = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]["id"]
    for index in range(4):
        patch(client, auth(), flow_id, {"description": f"edit {index}"})
    body = revisions(client, auth(), flow_id)
    assert [entry["revision"] for entry in body["data"]] == [5, 4, 3]
    assert body["meta"]["total"] == 3
    assert client.get(f"/flows/{flow_id}/revisions/2", headers=auth()).status_code == 404
    assert client.post(f"/flows/{flow_id}/restore", json={"revision": 1},
                       headers=auth()).status_code == 404


def test_a_trim_that_fails_loses_no_change_and_the_next_change_trims(
        build_app, auth: Headers, flow_body, monkeypatch: pytest.MonkeyPatch) -> None:
    app = build_app(history_max_revisions=3)
    client, store = app.test_client(), app.extensions["flow_repository"].store
    flow_id = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]["id"]
    for index in range(2):
        patch(client, auth(), flow_id, {"description": f"edit {index}"})
    trim = store.history.trim
    monkeypatch.setattr(store.history, "trim", unavailable)
    assert patch(client, auth(), flow_id, {"description": "kept"})["data"]["revision"] == 4
    monkeypatch.setattr(store.history, "trim", trim)
    assert revisions(client, auth(), flow_id)["data"][0]["flow"]["description"] == "kept"
    patch(client, auth(), flow_id, {"description": "trimmed"})
    assert [entry["revision"] for entry in revisions(client, auth(), flow_id)["data"]] == [
        5, 4, 3]


def test_zero_keeps_every_revision(build_app, auth: Headers, flow_body) -> None:
    client = build_app(history_max_revisions=0).test_client()
    flow_id = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]["id"]
    for index in range(4):
        patch(client, auth(), flow_id, {"description": f"edit {index}"})
    assert revisions(client, auth(), flow_id)["meta"]["total"] == 5


def test_deleting_a_flow_drops_its_history_once_the_deletion_event_is_out(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore
) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"name": "two"})
    oid = ObjectId(flow["id"])
    assert client.delete(f"/flows/{flow['id']}", headers=auth()).status_code == 200
    assert store.history.page(oid, 1, 10)[1] == 2  # kept while the event waits
    [claimed] = store.claim_batch("relay", utcnow() + timedelta(minutes=1), 10)
    published = [event["eventId"] for event in claimed["outbox"]]  # the relay sent them all
    store.finish_batch("relay", published={oid: published}, deleted=[oid])
    assert store.raw(oid) is None
    assert store.history.page(oid, 1, 10) == ([], 0)


# ----------------------------------------------------------------------------- GDPR


@pytest.mark.parametrize("kind", ["user", "tenant"])
def test_a_deleted_owner_is_pseudonymised_in_history(
    app, client: FlaskClient, auth: Headers, create: Create, store: FlowStore,
    monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:
    flow = create()
    patch(client, auth(), flow["id"], {"name": "two"})
    other = create(headers=auth("user-2", "tenant-2"))
    monkeypatch.setattr(store, "record_history", unavailable)  # one entry left pending
    patch(client, auth(), flow["id"], {"name": "three"})
    monkeypatch.undo()
    gone = "user-1" if kind == "user" else "tenant-1"

    app.extensions["flow_repository"].service.remove_owner(gone)

    admin = auth("admin", None, permissions=("all",))
    body = client.get(f"/flows/{flow['id']}/revisions", headers=admin).get_data(as_text=True)
    assert gone not in body
    entries = revisions(client, admin, flow["id"])["data"]
    assert [entry["revision"] for entry in entries] == [4, 3, 2, 1]
    assert entries[0]["kind"] == "owners" and entries[0]["sub"] is None
    if kind == "user":
        authors = {entry["sub"] for entry in entries[1:]}
        assert len(authors) == 1 and authors.pop().startswith("deleted-")
    kept = revisions(client, auth("user-2", "tenant-2"), other["id"])["data"]
    assert kept[0]["sub"] == "user-2"  # another owner's flow keeps its history as it was
