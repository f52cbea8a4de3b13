"""The history store contract, run against every backend (MongoDB/mongomock and SQLite)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import mongomock
import pymongo
import pytest
from bson import ObjectId

from flow_repository.adapters.store import FlowStore
from flow_repository.adapters.store.history import HistoryStore, MongoHistoryStore
from flow_repository.adapters.store.sqlite import Database, SqliteHistoryStore

MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def entry(flow_id: ObjectId, revision: int, kind: str = "definition", **fields: Any) -> dict:
    result = {"flowId": flow_id, "revision": revision, "kind": kind, "change": "updated",
              "sub": "user-1", "at": MOMENT, **fields}
    if kind == "definition":
        result.setdefault("flow", {"name": f"revision {revision}", "owners": [
            {"id": "user-1", "type": "user"}], "tenant": "tenant-1",
            "flowSettings": {"a.b": {"$x": 1}}})
    return result


@pytest.fixture(params=["mongo", "sqlite"])
def history(request: pytest.FixtureRequest, mongodb_url: str | None, run_id: str,
            tmp_path) -> Iterator[HistoryStore]:
    """The MongoDB backend (on the real server, else on mongomock) and the SQLite one."""
    if request.param == "sqlite":
        database = Database(str(tmp_path / "history.sqlite3"))
        yield SqliteHistoryStore(database)
        database.close()
        return
    client = (pymongo.MongoClient(mongodb_url, tz_aware=True) if mongodb_url
              else mongomock.MongoClient(tz_aware=True))
    backend = MongoHistoryStore(client[f"frtest_{run_id}"])
    backend.ensure_indexes()
    yield backend
    client.drop_database(f"frtest_{run_id}")
    client.close()


def test_recording_is_idempotent_per_flow_and_revision(history: HistoryStore) -> None:
    flow_id = ObjectId()
    history.record([entry(flow_id, 1), entry(flow_id, 2)])
    history.record([entry(flow_id, 2, flow={"name": "a second writer"})])
    entries, total = history.page(flow_id, 1, 10)
    assert total == 2
    assert entries[0]["flow"]["name"] == "revision 2"  # the first write stays
    assert entries[0]["flow"]["flowSettings"] == {"a.b": {"$x": 1}}
    assert entries[0]["at"] == MOMENT


def test_pages_are_newest_first_and_per_flow(history: HistoryStore) -> None:
    flow_id, other = ObjectId(), ObjectId()
    history.record([entry(flow_id, revision) for revision in range(1, 6)])
    history.record([entry(other, 1)])
    entries, total = history.page(flow_id, 2, 2)
    assert total == 5
    assert [item["revision"] for item in entries] == [3, 2]
    assert history.page(ObjectId(), 1, 10) == ([], 0)


def test_get_and_the_definition_in_force(history: HistoryStore) -> None:
    flow_id = ObjectId()
    history.record([entry(flow_id, 1), entry(flow_id, 2, "status", status={"to": "starting"}),
                    entry(flow_id, 3, "status", status={"to": "active"})])
    assert history.get(flow_id, 2)["status"] == {"to": "starting"}
    assert history.get(flow_id, 4) is None
    assert history.definition_at(flow_id, 3)["revision"] == 1
    assert history.definition_at(flow_id, 0) is None


def test_trim_and_drop(history: HistoryStore) -> None:
    flow_id, other = ObjectId(), ObjectId()
    history.record([entry(flow_id, revision) for revision in range(1, 5)])
    history.record([entry(other, 1)])
    history.trim(flow_id, 3)
    assert [item["revision"] for item in history.page(flow_id, 1, 10)[0]] == [4, 3]
    history.drop(flow_id)
    assert history.page(flow_id, 1, 10) == ([], 0)
    assert history.page(other, 1, 10)[1] == 1


def test_pseudonymise_replaces_the_id_as_author_owner_and_tenant(history: HistoryStore
                                                                 ) -> None:
    flow_id, other = ObjectId(), ObjectId()
    history.record([entry(flow_id, 1), entry(flow_id, 2, sub="user-2"),
                    entry(flow_id, 3, "status", status={"to": "starting"}),
                    entry(other, 1)])
    assert history.pseudonymise(flow_id, "user-1", "deleted-x") == 3
    assert history.pseudonymise(flow_id, "tenant-1", "deleted-t") == 2
    text = json.dumps(history.page(flow_id, 1, 10)[0], default=str)
    assert "user-1" not in text and "tenant-1" not in text
    assert history.get(flow_id, 2)["sub"] == "user-2"
    assert history.get(flow_id, 1)["flow"]["owners"] == [{"id": "deleted-x", "type": "user"}]
    assert history.get(other, 1)["sub"] == "user-1"  # other flows are not touched
    assert history.pseudonymise(flow_id, "user-1", "deleted-y") == 0  # idempotent


def test_reads_of_history_are_index_backed(store: FlowStore, mongodb_url: str | None) -> None:
    if mongodb_url is None:
        pytest.skip("explain() plans exist only on a real MongoDB server (--mongodb=secantus)")
    assert isinstance(store.history, MongoHistoryStore)
    flow_id = ObjectId()
    for _ in range(30):  # other flows' entries must not be examined
        store.history.record([entry(ObjectId(), revision) for revision in (1, 2)])
    store.history.record([entry(flow_id, revision) for revision in range(1, 30)])
    for name, plan in store.history.explain_reads(flow_id).items():
        stages = json.dumps(plan["queryPlanner"]["winningPlan"], default=str)
        assert "IXSCAN" in stages and "COLLSCAN" not in stages, (name, stages)
        examined = plan["executionStats"]["totalDocsExamined"]
        assert examined <= 29, (name, examined)  # this flow's entries at most, no other's
