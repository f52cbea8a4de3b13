"""Unit tests for flow_repository.store: key escaping, owner scope, atomic updates, indexes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from flow_repository.domain import ListQuery
from flow_repository.store import (
    FlowStore,
    StoreUnavailable,
    decode_keys,
    encode_keys,
    utcnow,
)

UNSAFE_KEYS = {"$where": 1, "a.b": 2, "~": 3, "~d": 4, "nul\x00key": 5, "$": 6, ".": 7,
               "plain": {"$in": [{"x.y": {"~t": "$value.stays"}}]}}
MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
ENTRY = {"entryId": "h1", "kind": "definition", "change": "updated", "at": MOMENT}


def document(owners: tuple[str, ...] = ("user-1",), **fields: Any) -> dict[str, Any]:
    return {
        "_id": ObjectId(), "name": "flow", "type": "ordinary", "status": "inactive",
        "owners": [{"id": owner, "type": "user"} for owner in owners], "revision": 1,
        "createdAt": MOMENT, "updatedAt": MOMENT, "graph": {"nodes": [], "edges": []},
        **fields,
    }


def all_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [key for key, item in value.items() for key in [key, *all_keys(item)]]
    if isinstance(value, list):
        return [key for item in value for key in all_keys(item)]
    return []


# ----------------------------------------------------------------------------- key escaping


def test_encoded_keys_hold_no_character_mongodb_refuses() -> None:
    for key in all_keys(encode_keys(UNSAFE_KEYS)):
        assert not key.startswith("$") and "." not in key and "\x00" not in key, key


def test_key_escaping_round_trips_every_key() -> None:
    assert decode_keys(encode_keys(UNSAFE_KEYS)) == UNSAFE_KEYS


def test_key_escaping_keeps_distinct_keys_distinct() -> None:
    encoded = encode_keys({"a.b": 1, "a~db": 2, "a~d": 3, "a.": 4})
    assert len(set(encoded)) == 4


def test_key_escaping_leaves_values_alone() -> None:
    assert encode_keys({"k": "$a.b~\x00", "l": ["$x"]}) == {"k": "$a.b~\x00", "l": ["$x"]}


def test_decoding_makes_naive_dates_utc() -> None:
    assert decode_keys({"at": datetime(2024, 1, 1)})["at"] == datetime(2024, 1, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------- insert and read


def test_insert_stores_escaped_keys_and_returns_the_original_ones(store: FlowStore) -> None:
    stored = store.insert(document(flowSettings=UNSAFE_KEYS))
    assert stored["flowSettings"] == UNSAFE_KEYS
    assert store.get(stored["_id"])["flowSettings"] == UNSAFE_KEYS
    raw = store.raw(stored["_id"])
    assert raw["flowSettings"] != UNSAFE_KEYS
    for key in all_keys(raw):
        assert not key.startswith("$") and "." not in key and "\x00" not in key, key


def test_get_is_limited_to_the_owner_scope(store: FlowStore) -> None:
    flow = store.insert(document(owners=("user-1", "tenant-1")))
    assert store.get(flow["_id"], ("user-1",))["_id"] == flow["_id"]
    assert store.get(flow["_id"], ("someone", "tenant-1"))["_id"] == flow["_id"]
    assert store.get(flow["_id"], ("someone", "other-tenant")) is None
    assert store.get(flow["_id"], None)["_id"] == flow["_id"]  # None: no scope (admin)


def test_get_of_an_unknown_id_is_none(store: FlowStore) -> None:
    assert store.get(ObjectId()) is None


def test_list_pages_within_scope_and_counts_the_total(store: FlowStore) -> None:
    mine = [store.insert(document(name=f"n{i}")) for i in range(5)]
    store.insert(document(owners=("user-2",), name="other"))
    query = ListQuery(page_size=2, page_number=2, sort_field="name")
    flows, total = store.list(query, ("user-1",))
    assert total == 5
    assert [flow["_id"] for flow in flows] == [mine[2]["_id"], mine[3]["_id"]]
    everything, total_all = store.list(ListQuery(page_size=100), None)
    assert total_all == 6 and len(everything) == 6


def test_list_search_treats_metacharacters_literally(store: FlowStore) -> None:
    store.insert(document(name="a.*b"))
    store.insert(document(name="aXXb"))
    store.insert(document(name="nul\x00name"))
    names = [flow["name"] for flow in store.list(ListQuery(search=".*"), None)[0]]
    assert names == ["a.*b"]
    names = [flow["name"] for flow in store.list(ListQuery(search="\x00"), None)[0]]
    assert names == ["nul\x00name"]


# ----------------------------------------------------------------------------- atomic updates


def test_update_applies_changes_bumps_revision_and_queues_events(store: FlowStore) -> None:
    flow = store.insert(document())
    before = utcnow()
    updated = store.update(flow["_id"], owner_ids=("user-1",), statuses=("inactive",),
                           revision=1, changes={"name": "renamed"},
                           events=[{"eventId": "e1", "name": "x"}], history=ENTRY)
    assert updated["name"] == "renamed"
    assert updated["revision"] == 2
    assert before <= updated["updatedAt"] <= utcnow()
    assert updated["updatedAt"] != flow["updatedAt"]
    assert [event["eventId"] for event in store.raw(flow["_id"])["outbox"]] == ["e1"]
    assert store.raw(flow["_id"])["historyOutbox"] == [ENTRY]


@pytest.mark.parametrize("precondition", [
    {"owner_ids": ("user-2",)},
    {"statuses": ("active", "starting")},
    {"revision": 7},
    {"owner_count": 2},
])
def test_update_changes_nothing_when_a_precondition_fails(
    store: FlowStore, precondition: dict[str, Any]
) -> None:
    flow = store.insert(document())
    before = store.raw(flow["_id"])
    assert store.update(flow["_id"], changes={"name": "renamed"}, history=ENTRY,
                        **precondition) is None
    assert store.raw(flow["_id"]) == before


def test_update_can_remove_one_owner(store: FlowStore) -> None:
    flow = store.insert(document(owners=("user-1", "user-2")))
    updated = store.update(flow["_id"], owner_ids=("user-2",), remove_owner="user-2",
                           history=ENTRY)
    assert updated["owners"] == [{"id": "user-1", "type": "user"}]


def test_deleted_flows_are_invisible(store: FlowStore) -> None:
    flow = store.insert(document())
    store.update(flow["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    assert store.get(flow["_id"]) is None
    assert store.list(ListQuery(), None) == ([], 0)
    assert store.owned_by("user-1") == []
    assert store.update(flow["_id"], changes={"name": "x"}, history=ENTRY) is None
    assert store.raw(flow["_id"])["deletedAt"] == MOMENT


def test_count_by_status_counts_live_flows(store: FlowStore) -> None:
    store.insert(document())
    store.insert(document(status="active"))
    store.insert(document(status="active"))
    gone = store.insert(document())
    store.update(gone["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    assert store.count_by_status() == {"inactive": 1, "active": 2}


# ----------------------------------------------------------------------------- housekeeping


def test_ensure_indexes_creates_the_query_indexes_idempotently(store: FlowStore) -> None:
    store.ensure_indexes()
    store.ensure_indexes()
    keys = {tuple(info["key"]) for info in store._flows.index_information().values()}
    for field in ("owners.id", "status", "type", "createdAt", "updatedAt", "name",
                  "fromTemplate", "outbox.0.storedAt"):
        assert ((field, 1),) in keys, field


def test_ping_succeeds_on_a_reachable_store(store: FlowStore) -> None:
    store.ping()


def test_unreachable_mongodb_raises_store_unavailable(down_store: FlowStore) -> None:
    with pytest.raises(StoreUnavailable):
        down_store.get(ObjectId())
    with pytest.raises(StoreUnavailable):
        down_store.ping()
    with pytest.raises(StoreUnavailable):
        down_store.insert(document())


def test_drop_all_empties_the_collection(store: FlowStore) -> None:
    store.insert(document())
    store.drop_all()
    assert store.list(ListQuery(), None) == ([], 0)


@pytest.mark.parametrize(("url", "expected"), [
    ("mongodb://127.0.0.1:1/flows", "majority"),  # the service's choice
    ("mongodb://127.0.0.1:1/flows?w=1", 1),  # an operator's explicit choice wins
])
def test_writes_wait_for_a_majority_unless_the_url_says_otherwise(
        settings, url: str, expected: Any) -> None:
    store = FlowStore.from_settings(settings.replace(mongodb_url=url))  # connects lazily
    assert store._flows.write_concern.document == {"w": expected}
