"""The store contract: the same tests on every backend (embedded SQLite, mongomock, and the
real server when --mongodb=secantus or --mongodb-url names one), plus key escaping."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import pytest
from bson import ObjectId

from flow_repository.adapters.store import (
    FlowStore,
    Store,
    StoreUnavailable,
    decode_keys,
    encode_keys,
    utcnow,
)
from flow_repository.domain.flow import STATUSES, ListQuery
from support import every_backend as pytest_generate_tests  # noqa: F401


@pytest.fixture
def store(backend: str, store_of: Callable[[str], Store]) -> Store:
    """This module's store: one of every backend in turn."""
    return store_of(backend)

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
    if store.history_with_change:
        assert "historyOutbox" not in store.raw(flow["_id"])
        assert store.history.get(flow["_id"], 2) == {**ENTRY, "flowId": flow["_id"], "revision": 2}
    else:
        assert store.raw(flow["_id"])["historyOutbox"] == [ENTRY]
        assert store.history.get(flow["_id"], 2) is None


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
    assert store.update(flow["_id"], changes={"name": "renamed"}, **precondition, history=ENTRY) is None
    assert store.raw(flow["_id"]) == before


def test_update_can_remove_one_owner(store: FlowStore) -> None:
    flow = store.insert(document(owners=("user-1", "user-2")))
    updated = store.update(flow["_id"], owner_ids=("user-2",), remove_owner="user-2", history=ENTRY)
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
    assert store.count_by_status(STATUSES) == {"inactive": 1, "active": 2, "starting": 0,
                                               "stopping": 0}


# ----------------------------------------------------------------------------- housekeeping


def test_ensure_indexes_is_idempotent(store: Store) -> None:
    flow = store.insert(document())
    store.ensure_indexes()
    store.ensure_indexes()
    assert store.get(flow["_id"])["_id"] == flow["_id"]


def test_ping_succeeds_on_a_reachable_store(store: Store) -> None:
    store.ping()


def test_ping_tells_a_running_mongodb_from_a_stopped_one(secantus) -> None:
    """A real server: ping passes while it runs and raises StoreUnavailable once it stops."""
    url, server = secantus
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
    store = FlowStore(client["ping-check"])
    store.ping()
    server.kill()  # gone at once, as after a crash (a clean shutdown may take a while)
    server.wait(30)
    with pytest.raises(StoreUnavailable):
        store.ping()
    client.close()


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


# ----------------------------------------------------------------------------- listing


def listing_oracle(flows: list[dict], query: ListQuery, owner_ids: tuple[str, ...] | None
                   ) -> tuple[list[ObjectId], int]:
    """What GET /flows must answer, computed naively from the stored flows."""
    def keep(flow: dict) -> bool:
        ids = {owner["id"] for owner in flow["owners"]}
        return ((owner_ids is None or bool(ids & set(owner_ids)))
                and (not query.user or query.user in ids)
                and (not query.status or flow["status"] == query.status)
                and (not query.type or flow["type"] == query.type)
                and (not query.from_template or flow.get("fromTemplate") == query.from_template)
                and (not query.search or any(query.search.lower() in flow[field].lower()
                                             for field in ("name", "description"))))

    found = sorted((flow for flow in flows if keep(flow)),
                   key=lambda flow: (flow[query.sort_field], flow["_id"]),
                   reverse=query.sort_descending)
    skip = (query.page_number - 1) * query.page_size
    return [flow["_id"] for flow in found[skip:skip + query.page_size]], len(found)


def seeded_flows(store: Store, count: int = 60) -> list[dict]:
    """Flows with varied owners, statuses, types, templates, names and times (fixed seed)."""
    chance = random.Random(7)
    flows = []
    for number in range(count):
        owners = chance.sample(["alice", "bob", "acme", "globex"], chance.randint(1, 2))
        moment = MOMENT + timedelta(minutes=chance.randint(0, 30))  # many equal times
        flows.append(store.insert(document(
            owners=tuple(owners), name=chance.choice(["alpha", "Beta", "gamma", "delta"])
            + f" {number % 7}", description=chance.choice(["sync CRM", "nightly ERP", "x"]),
            status=chance.choice(STATUSES), type=chance.choice(["ordinary", "realtime"]),
            fromTemplate=chance.choice([None, "0" * 24, "1" * 24]),
            createdAt=moment, updatedAt=moment + timedelta(seconds=number % 3))))
    gone = store.insert(document(owners=("alice",), name="alpha gone"))
    store.update(gone["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    return flows


LIST_QUERIES = [
    ListQuery(**options, sort_field=field, sort_descending=descending, page_number=page)
    for field in ("createdAt", "updatedAt", "name")
    for descending in (False, True)
    for page in (1, 3)
    for options in ({}, {"status": "active"}, {"type": "realtime"}, {"user": "bob"},
                    {"from_template": "1" * 24}, {"search": "ALPHA"}, {"search": "crm"},
                    {"status": "inactive", "user": "acme", "type": "ordinary"})
]


def test_list_answers_every_filter_and_sort_within_scope_and_as_admin(store: Store) -> None:
    flows = seeded_flows(store)
    for query in LIST_QUERIES:
        for scope in (("alice", "acme"), ("globex",), ("nobody",), None):
            page, total = store.list(query, scope)
            assert ([flow["_id"] for flow in page], total) == listing_oracle(flows, query, scope), (
                query, scope)


def test_owner_scoped_lists_follow_changes_to_sort_keys_owners_and_deletion(
        store: Store) -> None:
    flows = seeded_flows(store)
    chance = random.Random(11)
    for flow in chance.sample(flows, 20):
        store.update(flow["_id"], changes={"name": chance.choice(["aa", "zz", "mm"])},
                     history=ENTRY)
    for flow in chance.sample(flows, 10):
        store.update(flow["_id"], remove_owner=flow["owners"][0]["id"], history=ENTRY)
    for flow in chance.sample(flows, 5):
        store.update(flow["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    current = [store.get(flow["_id"]) for flow in flows]
    current = [flow for flow in current if flow is not None]
    for field in ("createdAt", "updatedAt", "name"):
        for descending in (False, True):
            for page in (1, 2, 4):
                query = ListQuery(page_size=7, page_number=page, sort_field=field,
                                  sort_descending=descending)
                for scope in (("alice", "acme"), ("bob",), ("globex", "globex")):
                    listed, total = store.list(query, scope)
                    assert ([flow["_id"] for flow in listed], total) == listing_oracle(
                        current, query, scope), (query, scope)


def test_list_pages_through_every_flow_exactly_once(store: Store) -> None:
    flows = seeded_flows(store, 45)
    for descending in (False, True):
        seen = []
        for page in range(1, 7):
            query = ListQuery(page_size=10, page_number=page, sort_field="name",
                              sort_descending=descending)
            seen += [flow["_id"] for flow in store.list(query, None)[0]]
        assert sorted(seen) == sorted(flow["_id"] for flow in flows)


# ----------------------------------------------------------------------------- copies


def test_callers_never_hold_stored_state(store: Store) -> None:
    source = document(flowSettings={"nested": {"list": [1, 2]}})
    flow = store.insert(source)
    source["flowSettings"]["nested"]["list"].append(3)
    flow["flowSettings"]["nested"]["list"].append(4)
    fetched = store.get(flow["_id"])
    fetched["owners"].append({"id": "intruder", "type": "user"})
    store.raw(flow["_id"])["flowSettings"]["nested"]["list"].append(5)
    changes = {"flowSettings": {"k": ["v"]}}
    updated = store.update(flow["_id"], changes=changes, history=ENTRY)
    changes["flowSettings"]["k"].append("w")
    updated["flowSettings"]["k"].append("x")
    again = store.get(flow["_id"])
    assert again["flowSettings"] == {"k": ["v"]}
    assert again["owners"] == [{"id": "user-1", "type": "user"}]
    assert again["graph"] == {"nodes": [], "edges": []}
    assert store.owned_by("intruder") == []


def test_dates_come_back_utc_at_millisecond_precision(store: Store) -> None:
    precise = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    flow = store.insert(document(createdAt=precise, cron_at=datetime(2024, 1, 1, 0, 0, 0, 999)))
    stored = store.get(flow["_id"])
    assert stored["createdAt"] == datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    assert stored["cron_at"] == datetime(2024, 1, 1, tzinfo=UTC)


def test_update_of_a_flow_without_revision_starts_counting_at_one(store: Store) -> None:
    flow = store.insert({"name": "bare", "owners": []})
    assert store.update(flow["_id"], changes={"name": "b"}, history=ENTRY)["revision"] == 1
    assert store.update(flow["_id"], changes={"name": "c"}, revision=(1, 5), history=ENTRY)["revision"] == 2


# ----------------------------------------------------------------------------- background scans


def test_stuck_finds_only_overdue_live_flows_with_that_retry_count(store: Store) -> None:
    def flow(status: str, minutes_ago: int, retries: int = 0, **extra: Any) -> ObjectId:
        return store.insert(document(status=status, statusRetries=retries,
                                     statusChangedAt=MOMENT - timedelta(minutes=minutes_ago),
                                     **extra))["_id"]

    overdue = [flow("starting", 10), flow("starting", 5)]
    flow("starting", 1)                      # not overdue yet
    flow("starting", 10, retries=1)          # other retry count
    flow("stopping", 10)                     # other status
    flow("active", 10)
    flow("starting", 10, deletedAt=MOMENT)   # deleted
    cutoff = MOMENT - timedelta(minutes=2)
    found = store.stuck("starting", cutoff, retries=0)
    assert sorted(f["_id"] for f in found) == sorted(overdue)
    assert len(store.stuck("starting", cutoff, retries=0, limit=1)) == 1


def test_owned_by_names_live_flows_of_that_owner(store: Store) -> None:
    mine = store.insert(document(owners=("alice", "acme")))
    store.insert(document(owners=("bob",)))
    gone = store.insert(document(owners=("alice",)))
    store.update(gone["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    assert store.owned_by("alice") == [mine["_id"]]
    assert store.owned_by("nobody") == []


def event(event_id: str, stored_at: datetime) -> dict[str, Any]:
    return {"eventId": event_id, "name": "flowrepo.flow.modified", "storedAt": stored_at}


def test_outbox_backlog_counts_every_pending_event_and_the_oldest(store: Store) -> None:
    assert store.outbox_backlog() == (0, None)
    store.insert(document(outbox=[event("a", MOMENT + timedelta(seconds=5)),
                                  event("b", MOMENT + timedelta(seconds=9))]))
    store.insert(document(outbox=[event("c", MOMENT)]))
    store.insert(document(outbox=[]))
    assert store.outbox_backlog() == (3, MOMENT)


def test_pending_flows_come_oldest_event_first_and_skip_live_leases(store: Store) -> None:
    now = utcnow()
    late = store.insert(document(outbox=[event("late", now - timedelta(seconds=1))]))["_id"]
    early = store.insert(document(outbox=[event("early", now - timedelta(seconds=9))]))["_id"]
    store.insert(document(outbox=[event("held", now - timedelta(seconds=20))],
                          relayLeaseUntil=now + timedelta(minutes=1), relayLeaseOwner="relay-a"))
    expired = store.insert(document(outbox=[event("old", now - timedelta(seconds=30))],
                                    relayLeaseUntil=now - timedelta(seconds=1)))["_id"]
    store.insert(document(outbox=[]))
    assert store.pending_flows(10) == [expired, early, late]
    assert store.pending_flows(2) == [expired, early]


def test_a_lease_excludes_other_relays_until_it_ends_or_is_released(store: Store) -> None:
    flow_id = store.insert(document(outbox=[event("e", MOMENT)]))["_id"]
    [claimed] = store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10)
    assert claimed["_id"] == flow_id and claimed["relayLeaseOwner"] == "relay-a"
    assert claimed["relayLeaseUntil"] > utcnow()
    assert store.claim_batch("relay-b", utcnow() + timedelta(minutes=1), 10) == []
    store.finish_batch("relay-b", published={flow_id: ["e"]})  # not its lease: nothing happens
    assert store.raw(flow_id)["relayLeaseOwner"] == "relay-a"
    assert [e["eventId"] for e in store.raw(flow_id)["outbox"]] == ["e"]
    store.finish_batch("relay-a", published={flow_id: []})  # gave up: the event stays
    assert "relayLeaseOwner" not in store.raw(flow_id)
    assert len(store.claim_batch("relay-b", utcnow() + timedelta(seconds=-1), 10)) == 1  # ends at once
    [claimed] = store.claim_batch("relay-c", utcnow() + timedelta(minutes=1), 10)
    assert claimed["relayLeaseOwner"] == "relay-c"


def test_a_flow_with_nothing_pending_cannot_be_claimed(store: Store) -> None:
    flow_id = store.insert(document(outbox=[event("e", MOMENT)]))["_id"]
    store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10)
    store.finish_batch("relay-a", published={flow_id: ["e"]})
    assert store.raw(flow_id)["outbox"] == []
    assert store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10) == []
    assert store.pending_flows(10) == []


def test_finishing_keeps_a_deleted_flow_while_events_are_pending(store: Store) -> None:
    flow_id = store.insert(document(outbox=[event("modified", MOMENT)]))["_id"]
    store.update(flow_id, changes={"deletedAt": MOMENT},
                 events=[event("deleted", MOMENT + timedelta(seconds=1))], history=ENTRY)
    assert store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10) != []
    # a relay that says the tombstone is done too early: it stays while events are pending
    store.finish_batch("relay-a", published={flow_id: ["modified"]}, deleted=[flow_id])
    assert [e["eventId"] for e in store.raw(flow_id)["outbox"]] == ["deleted"]
    assert store.pending_flows(10) == [flow_id]
    assert store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10) != []
    store.finish_batch("relay-a", published={flow_id: ["deleted"]}, deleted=[flow_id])
    assert store.raw(flow_id) is None  # its last event is out: removed for good


def test_a_tombstone_whose_events_all_went_is_removed_in_one_write(
        backend: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """MongoDB: when every tombstone of a batch is removed, nothing is left to update for
    them; the batch's live flows are finished in one more write."""
    if backend == "embedded":
        pytest.skip("the SQLite store finishes a batch in one transaction")
    from flow_repository.adapters.store import mongo

    gone, live = (store.insert(document(outbox=[event(name, MOMENT)]))["_id"]
                  for name in ("deleted", "modified"))
    store.update(gone, changes={"deletedAt": MOMENT}, history=ENTRY)
    store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10)
    write_all, commands = mongo.write_all, []

    def counted(collection: Any, writes: Any, **options: Any) -> int:
        commands.extend([[write.change is None for write in writes]] if writes else [])
        return write_all(collection, writes, **options)

    monkeypatch.setattr(mongo, "write_all", counted)
    store.finish_batch("relay-a", published={gone: ["deleted"]}, deleted=[gone])
    assert commands == [[True]] and store.raw(gone) is None
    store.finish_batch("relay-a", published={live: ["modified"]})
    assert commands[1:] == [[False, False]]
    assert store.raw(live)["outbox"] == [] and "relayLeaseOwner" not in store.raw(live)


@pytest.mark.parametrize("applied", [0, 1, 2, 3])
def test_a_relay_dying_mid_batch_never_strands_a_tombstone(
        backend: str, store: Store, applied: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """MongoDB applies a batch's writes one command after another, so a relay killed
    between two of them leaves a prefix applied: the tombstone is then gone, or it keeps
    its events and a relay claims it again. (SQLite finishes a batch in one transaction.)"""
    if backend == "embedded":
        pytest.skip("the SQLite store finishes a batch in one transaction: no prefix to apply")
    from flow_repository.adapters.store import mongo

    flow_id = store.insert(document(outbox=[event("modified", MOMENT)]))["_id"]
    store.update(flow_id, changes={"deletedAt": MOMENT},
                 events=[event("deleted", MOMENT + timedelta(seconds=1))], history=ENTRY)
    store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10)
    write_all = mongo.write_all

    def dies_after_some(collection: Any, writes: Any, **options: Any) -> None:
        write_all(collection, writes[:applied], **options)

    monkeypatch.setattr(mongo, "write_all", dies_after_some)
    store.finish_batch("relay-a", published={flow_id: ["modified", "deleted"]},
                       deleted=[flow_id])
    monkeypatch.setattr(mongo, "write_all", write_all)
    raw = store.raw(flow_id)
    if raw is not None:  # not removed yet: its events are still there to claim
        assert [e["eventId"] for e in raw["outbox"]] == ["modified", "deleted"]
        [claimed] = store.claim_batch("relay-b", utcnow() + timedelta(minutes=1), 10,
                                      [flow_id]) if "relayLeaseOwner" not in raw else [raw]
        store.finish_batch(claimed["relayLeaseOwner"],
                           published={flow_id: ["modified", "deleted"]}, deleted=[flow_id])
    assert store.raw(flow_id) is None


def test_finishing_never_removes_a_live_flow(store: Store) -> None:
    flow_id = store.insert(document(outbox=[event("e", MOMENT)]))["_id"]
    store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10)
    # a wrong flag does not remove it either
    store.finish_batch("relay-a", published={flow_id: ["e"]}, deleted=[flow_id])
    assert store.get(flow_id)["outbox"] == []


@pytest.mark.parametrize(("url", "expected"), [
    ("mongodb://127.0.0.1:1/flows", "majority"),  # the service's choice
    ("mongodb://127.0.0.1:1/flows?w=1", 1),  # an operator's explicit choice wins
])
def test_writes_wait_for_a_majority_unless_the_url_says_otherwise(
        settings, url: str, expected: Any) -> None:
    store = FlowStore.from_settings(settings.replace(mongodb_url=url))  # connects lazily
    assert store._flows.write_concern.document == {"w": expected}


def test_finishing_a_batch_gives_back_only_its_own_leases(store: Store) -> None:
    mine = store.insert(document(outbox=[event("a", MOMENT)]))["_id"]
    theirs = store.insert(document(outbox=[event("b", MOMENT + timedelta(seconds=1))]))["_id"]
    assert [flow["_id"] for flow in store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 1)] \
        == [mine]
    assert [flow["_id"] for flow in store.claim_batch("relay-b", utcnow() + timedelta(minutes=1), 5)] \
        == [theirs]
    store.finish_batch("relay-a", published={mine: ["a"], theirs: ["b"]})
    assert "relayLeaseOwner" not in store.raw(mine)
    assert store.raw(mine)["outbox"] == []
    assert store.raw(theirs)["relayLeaseOwner"] == "relay-b"
    assert [e["eventId"] for e in store.raw(theirs)["outbox"]] == ["b"]


def test_a_write_takes_the_lease_along_only_when_no_relay_holds_one(store: Store) -> None:
    free = store.insert(document())["_id"]
    until = utcnow() + timedelta(minutes=1)
    written = store.update(free, events=[event("e", MOMENT)], history=ENTRY,
                           lease=("relay-a", until))
    assert (written["relayLeaseOwner"], written["relayLeaseUntil"]) == ("relay-a", until)
    assert store.claim_batch("relay-b", utcnow() + timedelta(minutes=1), 10) == []  # held by relay-a
    again = store.update(free, events=[event("f", MOMENT)], history=ENTRY,
                         lease=("relay-b", until + timedelta(seconds=1)))
    assert again["relayLeaseOwner"] == "relay-a"  # written all the same, lease unchanged
    assert [e["eventId"] for e in again["outbox"]] == ["e", "f"]
    expired = store.insert(document(relayLeaseUntil=utcnow() - timedelta(seconds=1),
                                    relayLeaseOwner="relay-gone"))["_id"]
    taken = store.update(expired, events=[event("g", MOMENT)], history=ENTRY,
                         lease=("relay-c", until))
    assert taken["relayLeaseOwner"] == "relay-c"
    assert store.update(expired, revision=99, history=ENTRY, lease=("relay-c", until)) is None


def test_a_claim_by_id_takes_only_those_flows_that_are_claimable(store: Store) -> None:
    wanted = store.insert(document(outbox=[event("a", MOMENT)]))["_id"]
    other = store.insert(document(outbox=[event("b", MOMENT)]))["_id"]
    idle = store.insert(document(outbox=[]))["_id"]
    claimed = store.claim_batch("relay-a", utcnow() + timedelta(minutes=1), 10, [idle, wanted])
    assert [flow["_id"] for flow in claimed] == [wanted]
    assert "relayLeaseOwner" not in store.raw(other)
    assert store.claim_batch("relay-b", utcnow() + timedelta(minutes=1), 10, [wanted]) == []


def test_a_write_with_nothing_to_publish_leaves_the_lease_alone_where_history_goes_with_it(
        store: Store) -> None:
    if not store.history_with_change:
        pytest.skip("the relay records this store's history: a write leases the flow for it")
    flow_id = store.insert(document())["_id"]
    written = store.update(flow_id, history=ENTRY, lease=("relay-a", utcnow() + timedelta(minutes=1)))
    assert "relayLeaseOwner" not in written and "relayLeaseOwner" not in store.raw(flow_id)


def test_finishing_a_batch_drops_recorded_history_entries(store: Store) -> None:
    if store.history_with_change:
        pytest.skip("nothing is left pending: the entry is written with its change "
                    "(test_store_sqlite covers entries an earlier layout left pending)")
    flow_id = store.insert(document(historyOutbox=[{"entryId": "h1"}, {"entryId": "h2"}]))["_id"]
    store.finish_batch("relay-a", published={}, recorded={flow_id: ["h1"]})
    assert [entry["entryId"] for entry in store.raw(flow_id)["historyOutbox"]] == ["h2"]
