"""The change feed's store contract (GET /flows/events), on every backend: embedded SQLite,
mongomock, and the real server with --mongodb=secantus."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from flow_repository.adapters.store import Store, decode_keys, utcnow
from flow_repository.adapters.store.base import pending_feed_entries
from support import every_backend as pytest_generate_tests  # noqa: F401


@pytest.fixture
def store(backend: str, store_of: Callable[[str], Store]) -> Store:
    return store_of(backend)


def entry(change: str = "created", kind: str = "definition", **fields: Any) -> dict:
    return {"entryId": str(ObjectId()), "kind": kind, "change": change, "sub": "user-1",
            "at": utcnow(), **fields}


def new_flow(store: Store, owners: tuple[str, ...] = ("user-1",)) -> dict:
    document = {"name": "f", "owners": [{"id": owner, "type": "user"} for owner in owners],
                "status": "inactive", "type": "ordinary", "revision": 1,
                "historyOutbox": [entry()]}
    return store.insert(document)


def record_pending(store: Store, *flow_ids: ObjectId) -> None:
    """What the recorder does after a write (a no-op for the feed on SQLite)."""
    store.changes.record([decode_keys(store.raw(flow_id)) for flow_id in flow_ids])


def test_changes_are_numbered_in_order_with_name_status_and_owners(store: Store) -> None:
    flow = new_flow(store)
    record_pending(store, flow["_id"])
    store.update(flow["_id"], changes={"name": "g"}, history=entry("updated"))
    record_pending(store, flow["_id"])
    store.update(flow["_id"], changes={"status": "starting"}, history=entry(
        "start", "status", status={"from": "inactive", "to": "starting"}))
    record_pending(store, flow["_id"])
    store.update(flow["_id"], changes={"deletedAt": utcnow()}, history=entry("deleted", "deleted"))
    record_pending(store, flow["_id"])
    changes = [change for change in store.changes.after(0, 100) if not change.get("hole")]
    assert [(c["revision"], c["change"], c["status"]) for c in changes] == [
        (1, "created", "inactive"), (2, "modified", "inactive"), (3, "status", "starting"),
        (4, "deleted", "starting")]
    assert all(c["flowId"] == flow["_id"] and c["owners"] == ["user-1"] for c in changes)
    seqs = [c["seq"] for c in changes]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert store.changes.newest() == store.changes.after(0, 100)[-1]["seq"]
    assert store.changes.allocated() >= store.changes.newest()
    assert [c["seq"] for c in store.changes.after(seqs[1], 100)
            if not c.get("hole")] == seqs[2:]


def test_recording_again_changes_nothing(store: Store) -> None:
    flow = new_flow(store)
    record_pending(store, flow["_id"])
    record_pending(store, flow["_id"])  # a retry, a second relay, a read-repair
    changes = store.changes.after(0, 100)
    assert [change["revision"] for change in changes if not change.get("hole")] == [1]
    # a number the repeat took is a hole at once: no reader ever waits for it
    assert [change["seq"] for change in changes] == list(range(1, len(changes) + 1))


def test_an_abandoned_number_is_a_hole_and_a_later_change_gets_a_new_one(store: Store) -> None:
    first = new_flow(store)
    record_pending(store, first["_id"])
    newest = store.changes.newest()
    store.changes.abandon(newest + 1)
    store.changes.abandon(newest)  # held by a change: stays that change
    second = new_flow(store)
    record_pending(store, second["_id"])
    after = store.changes.after(newest - 1, 100)
    assert after[0]["flowId"] == first["_id"]
    assert [c.get("hole", False) for c in after if c["seq"] == newest + 1] in ([True], [])
    assert [c["flowId"] for c in after if not c.get("hole")] == [first["_id"], second["_id"]]
    assert after[-1]["seq"] > newest + 1 or store.changes.after(newest, 1)[0].get("hole")


def test_trimming_raises_the_mark_and_removes_old_changes(store: Store) -> None:
    flow = new_flow(store)
    record_pending(store, flow["_id"])
    kept_from = store.changes.newest()
    assert store.changes.trimmed_through() == 0
    assert store.changes.trim(utcnow() - timedelta(hours=1)) == 0  # nothing that old
    mark = store.changes.trim(utcnow() + timedelta(seconds=5))
    assert mark == kept_from == store.changes.trimmed_through()
    assert store.changes.after(0, 10) == []
    assert store.changes.newest() == mark
    store.changes.abandon(mark)  # below the mark: never refilled
    assert store.changes.after(0, 10) == []


def test_forgetting_an_owner_rewrites_the_feed(store: Store) -> None:
    flow = new_flow(store, owners=("user-1", "tenant-1"))
    record_pending(store, flow["_id"])
    store.changes.forget_owner(flow["_id"], "user-1", "deleted-x")
    [change] = store.changes.after(0, 10)
    assert change["owners"] == ["deleted-x", "tenant-1"]


def test_pending_entries_take_the_status_they_left() -> None:
    flow = {"_id": ObjectId(), "revision": 3, "status": "active", "owners": [],
            "historyOutbox": [entry("updated"),
                              entry("start", "status", status={"from": "inactive",
                                                               "to": "starting"}),
                              entry("started", "status", status={"from": "starting",
                                                                 "to": "active"})]}
    assert [(r["revision"], r["status"], r["change"]) for r in pending_feed_entries(flow)] == [
        (1, "inactive", "modified"), (2, "starting", "status"), (3, "active", "status")]


def test_concurrent_writers_leave_no_number_undecided(store: Store) -> None:
    """Writers racing on one counter: every number up to the newest is a change or a
    hole, each change once."""
    flows = [new_flow(store) for _ in range(12)]
    threads = [threading.Thread(target=record_pending, args=(store, flow["_id"]))
               for flow in flows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    newest = store.changes.newest()
    for seq in range(1, newest + 1):
        store.changes.abandon(seq)  # what a reader does after its wait
    seen = store.changes.after(0, 1000)
    assert [c["seq"] for c in seen] == list(range(seen[0]["seq"], newest + 1))
    recorded = [c["flowId"] for c in seen if not c.get("hole")]
    assert sorted(recorded) == sorted(flow["_id"] for flow in flows)


def test_every_query_of_the_feed_reads_an_index(store: Store, backend: str) -> None:
    if backend != "server":
        pytest.skip("explain() plans exist only on a real MongoDB server (--mongodb=secantus)")
    flows = [new_flow(store) for _ in range(20)]
    record_pending(store, *(flow["_id"] for flow in flows))
    for name, plan in store.changes.explain_reads(flows[3]["_id"]).items():
        stages = json.dumps(plan["queryPlanner"]["winningPlan"], default=str)
        assert "COLLSCAN" not in stages, (name, stages)
        assert "IXSCAN" in stages or "IDHACK" in stages or "EXPRESS" in stages, (name, stages)
        if name in ("recorded", "forgetOwner"):  # one flow's changes, never another's
            assert plan["executionStats"]["totalDocsExamined"] <= 1, (name, stages)


def test_a_batch_whose_numbers_another_writer_takes_first_keeps_each_flows_order(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """MongoDB: another writer inserts at the number this batch read as next: the insert
    stops there and the rest go in after the new newest, in their order, with no gap."""
    if backend == "embedded":
        pytest.skip("SQLite numbers a change in the transaction that makes it")
    flow, other = new_flow(store), new_flow(store)
    store.update(flow["_id"], changes={"name": "g"}, history=entry("updated"))
    newest = store.changes.newest
    raced: list[int] = []

    def overtaken() -> int:
        seen = newest()
        if not raced:  # between this read and the batch's insert, another writer records
            raced.append(seen)
            record_pending(store, other["_id"])
        return seen

    monkeypatch.setattr(store.changes, "newest", overtaken)
    record_pending(store, flow["_id"])
    monkeypatch.undo()
    everything = store.changes.after(0, 100)
    assert [(c["flowId"], c["revision"]) for c in everything] == [
        (other["_id"], 1), (flow["_id"], 1), (flow["_id"], 2)]
    assert [c["seq"] for c in everything] == [1, 2, 3]  # no holes, nothing to wait for


def test_a_batch_holding_a_change_recorded_before_records_the_others(store: Store) -> None:
    first, second, third = new_flow(store), new_flow(store), new_flow(store)
    record_pending(store, second["_id"])  # recorded before (a retry, a second relay)
    record_pending(store, first["_id"], second["_id"], third["_id"])
    changes = [c for c in store.changes.after(0, 100) if not c.get("hole")]
    # each once (SQLite numbered them when written; MongoDB when recorded)
    assert sorted(c["flowId"] for c in changes) == sorted(
        [first["_id"], second["_id"], third["_id"]])
