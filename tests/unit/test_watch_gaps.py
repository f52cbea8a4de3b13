"""The change feed's readers never skip a number (services/watch.py on the MongoDB backend):
a missing seq is waited for, then abandoned; a writer slower than the wait gets a new one.

Writers of this version leave no gaps (a number is taken by inserting at the one after the
newest); feeds written by earlier versions, which took numbers from a counter first, can
hold them, and these tests write such a feed by hand."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import FlowStore, utcnow
from flow_repository.adapters.store.base import pending_feed_entries
from flow_repository.domain.flow import ListQuery
from flow_repository.services.watch import ChangeWatch, WatchLimits

ALICE = Principal("alice", "acme", frozenset({"flows.read"}), False)
GAP = 0.3


@pytest.fixture
def store() -> Iterator[FlowStore]:
    backend = FlowStore.on_mongomock()
    backend.ensure_indexes()
    yield backend
    backend.drop_all()


@pytest.fixture
def hub(store: FlowStore) -> Iterator[ChangeWatch]:
    watch = ChangeWatch(store, WatchLimits(poll_seconds=0.02, gap_seconds=GAP))
    yield watch
    watch.shutdown()


def flow(owner: str = "alice") -> dict[str, Any]:
    return {"_id": ObjectId(), "revision": 1, "status": "inactive", "type": "ordinary",
            "owners": [{"id": owner, "type": "user"}],
            "historyOutbox": [{"entryId": "e", "kind": "definition", "change": "created",
                               "at": utcnow()}]}


def insert_at(store: FlowStore, seq: int, written: dict[str, Any]) -> None:
    """What an earlier version's writer did after taking ``seq`` from its counter."""
    [entry] = pending_feed_entries(written)
    store.changes._changes.insert_one({**entry, "_id": seq, "key": f"{written['_id']}:1"})


def test_a_missing_number_is_waited_for_and_then_abandoned(store: FlowStore,
                                                           hub: ChangeWatch) -> None:
    watcher = hub.open(ALICE, None, ListQuery())
    taken = store.changes.newest() + 1  # a writer took it and has not inserted yet
    later = flow()
    insert_at(store, taken + 1, later)
    started = hub.clock()
    changes = watcher.next_changes(5)
    assert [change["flowId"] for change in changes] == [later["_id"]]
    assert hub.clock() - started >= GAP * 0.9  # it waited for the missing one first
    assert store.changes.after(taken - 1, 1)[0].get("hole") is True
    watcher.close()


def test_a_writer_within_the_wait_is_delivered_in_order(store: FlowStore,
                                                        hub: ChangeWatch) -> None:
    watcher = hub.open(ALICE, None, ListQuery())
    slow, fast = flow(), flow()
    taken = store.changes.newest() + 1
    insert_at(store, taken + 1, fast)

    def finish_slow_writer() -> None:
        insert_at(store, taken, slow)

    writer = threading.Timer(GAP / 3, finish_slow_writer)
    writer.start()
    seen: list[ObjectId] = []
    while len(seen) < 2:
        seen += [change["flowId"] for change in watcher.next_changes(5)]
    writer.join()
    assert seen == [slow["_id"], fast["_id"]]
    watcher.close()


def test_a_writer_slower_than_the_wait_takes_a_new_number(store: FlowStore,
                                                          hub: ChangeWatch) -> None:
    watcher = hub.open(ALICE, None, ListQuery())
    taken = store.changes.newest() + 1
    store.changes.abandon(taken)  # what a reader did after its wait
    late = flow()
    store.changes.record([late])  # its insert at ``taken`` would meet the hole: next number
    [change] = watcher.next_changes(5)
    assert change["flowId"] == late["_id"] and change["seq"] > taken
    watcher.close()


def test_changes_of_flows_the_caller_cannot_see_are_left_out(store: FlowStore,
                                                             hub: ChangeWatch) -> None:
    watcher = hub.open(ALICE, None, ListQuery())
    store.changes.record([flow("bob"), flow("bob")])
    mine = flow()
    store.changes.record([mine])
    assert [change["flowId"] for change in watcher.next_changes(5)] == [mine["_id"]]
    watcher.close()
