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
from flow_repository.adapters.store.base import (
    pending_entries,
    pending_feed_entries,
    recorded_entries,
)
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


def newest_reads(monkeypatch: pytest.MonkeyPatch, feed: Any) -> list[int]:
    """Count the feed's reads of its newest number (one round trip each)."""
    reads: list[int] = []
    newest = feed.newest

    def counted() -> int:
        reads.append(newest())
        return reads[-1]

    monkeypatch.setattr(feed, "newest", counted)
    return reads


def test_a_feed_that_wrote_last_records_its_next_batches_without_reading_the_newest(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "embedded":
        pytest.skip("SQLite numbers a change in the transaction that makes it")
    flows = [new_flow(store) for _ in range(4)]
    reads = newest_reads(monkeypatch, store.changes)
    for flow in flows:
        record_pending(store, flow["_id"])
    assert len(reads) == 1  # the first batch only: the others follow this feed's own
    assert [(c["seq"], c["flowId"]) for c in store.changes.after(0, 100)] == [
        (seq, flow["_id"]) for seq, flow in enumerate(flows, start=1)]


def test_writers_taking_turns_on_stale_guesses_leave_no_gap_and_record_each_change_once(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' feeds over one database: each one's guess is stale whenever the
    other wrote last. A stale guess is refused (never a number ahead of the feed), the
    feed reads the newest and inserts after it, then reads first for a while."""
    if backend == "embedded":
        pytest.skip("SQLite numbers a change in the transaction that makes it")
    from flow_repository.adapters.store.changes import STALE_PAUSE, MongoChangeFeed

    other = MongoChangeFeed(store.changes._changes.database, store._lock)
    feeds = [store.changes, other]
    reads = [newest_reads(monkeypatch, feed) for feed in feeds]
    flows = [new_flow(store) for _ in range(6)]
    for index, flow in enumerate(flows):
        store.update(flow["_id"], changes={"name": "g"}, history=entry("updated"))
        feeds[index % 2].record([decode_keys(store.raw(flow["_id"]))])
    # each feed: a first read, one after its stale guess, then reads first (no guesses)
    assert [len(feed_reads) for feed_reads in reads] == [3, 3]
    assert feeds[0]._read_first == STALE_PAUSE - 1
    everything = store.changes.after(0, 100)
    assert [c["seq"] for c in everything] == list(range(1, 13))
    assert [(c["flowId"], c["revision"]) for c in everything] == [
        (flow["_id"], revision) for flow in flows for revision in (1, 2)]


def test_feeds_racing_on_guesses_leave_no_number_undecided(backend: str, store: Store) -> None:
    if backend == "embedded":
        pytest.skip("SQLite numbers a change in the transaction that makes it")
    from flow_repository.adapters.store.changes import MongoChangeFeed

    feeds = [store.changes, *(MongoChangeFeed(store.changes._changes.database, store._lock)
                              for _ in range(2))]
    flows = [new_flow(store) for _ in range(24)]

    def record_share(feed: Any, share: list[dict]) -> None:
        for flow in share:
            feed.record([decode_keys(store.raw(flow["_id"]))])

    threads = [threading.Thread(target=record_share, args=(feed, flows[index::3]))
               for index, feed in enumerate(feeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = store.changes.after(0, 100)
    assert [c["seq"] for c in everything] == list(range(1, 25))  # no hole to wait for
    assert sorted(c["flowId"] for c in everything) == sorted(flow["_id"] for flow in flows)


def record_history_of(store: Store, *flow_ids: ObjectId) -> list[dict]:
    """What the recorder does after a write: the feed and the history; returns the entries."""
    flows = [decode_keys(store.raw(flow_id)) for flow_id in flow_ids]
    entries = [recorded for flow in flows
               for recorded in recorded_entries(flow, pending_entries(flow))]
    store.record_history(flows, entries)
    return entries


def history_writes(monkeypatch: pytest.MonkeyPatch, store: Store) -> list[int]:
    """Count the history's own writes (a round trip each), apart from any carried along."""
    writes: list[int] = []
    record = store.history.record

    def counted(entries: Any) -> None:
        writes.append(len(entries))
        record(entries)

    monkeypatch.setattr(store.history, "record", counted)
    return writes


def test_the_feed_and_the_history_of_a_batch_go_in_one_command_on_mongodb_8(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a server that takes several collections' writes at once (bulkWrite, MongoDB 8.0),
    a feed that wrote last records a batch's changes and history entries in one command;
    mongomock writes the history on its own."""
    if backend == "embedded":
        pytest.skip("SQLite writes a change's feed row and history entry with the change")
    flows = [new_flow(store) for _ in range(3)]
    record_history_of(store, flows[0]["_id"])  # the feed's first batch reads the newest
    reads, writes = newest_reads(monkeypatch, store.changes), history_writes(monkeypatch, store)
    store.update(flows[1]["_id"], changes={"name": "g"}, history=entry("updated"))
    entries = record_history_of(store, flows[1]["_id"], flows[2]["_id"])
    assert reads == []
    assert writes == ([] if backend == "server" else [3])  # (2 + 1 entries)
    for recorded in entries:
        assert store.history.get(recorded["flowId"], recorded["revision"])["entryId"] == \
            recorded["entryId"]
    assert [(c["flowId"], c["revision"]) for c in store.changes.after(1, 100)] == [
        (flows[1]["_id"], 1), (flows[1]["_id"], 2), (flows[2]["_id"], 1)]


def test_history_carried_along_that_a_racing_writer_stored_first_is_written_after(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two upserts of one history entry racing: the loser's duplicate key stops the
    entries after it in the shared command; they are written on their own, and the entry
    stored first is kept."""
    if backend != "server":
        pytest.skip("only a real server (--mongodb=secantus) carries history along the feed")
    from pymongo.errors import ClientBulkWriteException

    flows = [new_flow(store) for _ in range(3)]
    record_history_of(store, flows[0]["_id"])
    second = decode_keys(store.raw(flows[1]["_id"]))
    [raced] = recorded_entries(second, pending_entries(second))
    client = store.changes._changes.database.client
    bulk_write, record = client.bulk_write, store.history.record

    def racing(models: list, **options: Any) -> None:
        # the other writer's upsert lands between this command's match and its insert
        record([{**raced, "sub": "the other writer"}])
        bulk_write(models[:2], **options)  # the feed's two changes
        raise ClientBulkWriteException(
            {"writeErrors": [{"idx": 2, "code": 11000}], "anySuccessful": True}, False)

    monkeypatch.setattr(client, "bulk_write", racing)
    writes = history_writes(monkeypatch, store)
    entries = record_history_of(store, flows[1]["_id"], flows[2]["_id"])
    assert writes == [2]
    assert store.history.get(flows[1]["_id"], 1)["sub"] == "the other writer"
    assert store.history.get(flows[2]["_id"], 1)["entryId"] == entries[1]["entryId"]
    assert [c["seq"] for c in store.changes.after(0, 100)] == [1, 2, 3]
    assert store.changes._several_collections  # a race, not a server that cannot


@pytest.mark.parametrize("refusal", ["stale guess", "server before 8.0"])
def test_history_that_could_not_go_along_the_feed_is_written_on_its_own(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    if backend != "server":
        pytest.skip("only a real server (--mongodb=secantus) carries history along the feed")
    from pymongo.errors import InvalidOperation

    from flow_repository.adapters.store.changes import MongoChangeFeed

    flows = [new_flow(store) for _ in range(3)]
    record_history_of(store, flows[0]["_id"])
    if refusal == "stale guess":  # another process's feed took the next number
        MongoChangeFeed(store.changes._changes.database, store._lock).record(
            [decode_keys(store.raw(flows[2]["_id"]))])
    else:
        def older_server(*arguments: Any, **options: Any) -> None:
            raise InvalidOperation("MongoClient.bulk_write requires MongoDB server 8.0+")

        monkeypatch.setattr(store.changes._changes.database.client, "bulk_write", older_server)
    writes = history_writes(monkeypatch, store)
    [written] = record_history_of(store, flows[1]["_id"])
    assert writes == [1]
    assert store.history.get(flows[1]["_id"], 1)["entryId"] == written["entryId"]
    assert store.changes._several_collections is (refusal == "stale guess")
    assert [c["seq"] for c in store.changes.after(0, 100)] == list(
        range(1, 4 if refusal == "stale guess" else 3))


def test_a_shared_command_the_database_drops_writes_nothing_and_a_retry_writes_both(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """MongoDB away during the feed-and-history command: StoreUnavailable, as for any store
    call; the entries stay pending in the flow, and the next try records them once."""
    if backend != "server":
        pytest.skip("only a real server (--mongodb=secantus) carries history along the feed")
    from pymongo.errors import AutoReconnect

    from flow_repository.adapters.store import StoreUnavailable

    flows = [new_flow(store) for _ in range(2)]
    record_history_of(store, flows[0]["_id"])
    client = store.changes._changes.database.client

    def dropped(*arguments: Any, **options: Any) -> None:
        raise AutoReconnect("connection closed")

    monkeypatch.setattr(client, "bulk_write", dropped)
    with pytest.raises(StoreUnavailable):
        record_history_of(store, flows[1]["_id"])
    assert store.history.get(flows[1]["_id"], 1) is None
    assert [c["flowId"] for c in store.changes.after(0, 100)] == [flows[0]["_id"]]
    monkeypatch.undo()
    [written] = record_history_of(store, flows[1]["_id"])
    assert store.history.get(flows[1]["_id"], 1)["entryId"] == written["entryId"]
    assert [(c["seq"], c["flowId"]) for c in store.changes.after(0, 100)] == [
        (1, flows[0]["_id"]), (2, flows[1]["_id"])]
