"""Every steady-state query is index-backed on a real MongoDB server (explain, executionStats).

The queries are the ones flow_repository/adapters/store/queries.py builds for the MongoDB backend,
run through FlowStore.explain exactly as the store runs them (same filter, sort and hint).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from flow_repository.adapters.store import FlowStore, queries, utcnow
from flow_repository.domain.flow import STATUSES, ListQuery

MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
INDEX_STAGES = {"IXSCAN", "IDHACK", "COUNT_SCAN", "DISTINCT_SCAN", "EXPRESS_IXSCAN",
                "EXPRESS_CLUSTERED_IXSCAN"}


@pytest.fixture
def server(store) -> FlowStore:
    """The session's store, when it is a real MongoDB server."""
    if not (isinstance(store, FlowStore) and store._real):
        pytest.skip("explain() query plans exist only on a real MongoDB server")
    return store


def flow(owners: tuple[str, ...] = ("alice", "acme"), **fields: Any) -> dict[str, Any]:
    return {"_id": ObjectId(), "name": "flow", "description": "d", "type": "ordinary",
            "status": "inactive", "statusRetries": 0, "statusChangedAt": MOMENT,
            "owners": [{"id": owner, "type": "user"} for owner in owners], "revision": 1,
            "createdAt": MOMENT, "updatedAt": MOMENT, "fromTemplate": "1" * 24,
            "outbox": [], **fields}


def plan_of(explained: dict) -> tuple[dict, dict]:
    """The winning plan and the execution stats, for finds, counts and findAndModify."""
    planner = explained.get("queryPlanner")
    stats = explained.get("executionStats", {})
    if planner is None:  # an aggregation: the plan is in its $cursor stage
        cursor = explained["stages"][0]["$cursor"]
        planner, stats = cursor["queryPlanner"], cursor.get("executionStats", {})
    winning = planner["winningPlan"]
    return winning.get("queryPlan", winning), stats


def stages(plan: dict) -> list[dict]:
    found = [plan]
    for child in ([plan["inputStage"]] if "inputStage" in plan else []) + plan.get(
            "inputStages", []):
        found += stages(child)
    return found


def index_used(explained: dict) -> str:
    """The index the winning plan reads; fails when any stage of it scans the collection."""
    plan, _ = plan_of(explained)
    tree = stages(plan)
    names = [stage["stage"] for stage in tree]
    assert "COLLSCAN" not in names, names
    used = [stage.get("indexName", "_id_") for stage in tree if stage["stage"] in INDEX_STAGES]
    assert used, names
    return used[0]


def examined(explained: dict) -> tuple[int, int]:
    _, stats = plan_of(explained)
    return stats["totalKeysExamined"], stats["totalDocsExamined"]


# ----------------------------------------------------------------------------- reads


def test_get_by_id_reads_the_id_index(server: FlowStore) -> None:
    stored = server.insert(flow())
    assert index_used(server.explain(queries.by_id(stored["_id"]))) == "_id_"


FILTERS = {"none": {}, "status": {"status": "active"}, "type": {"type": "realtime"},
           "user": {"user": "alice"}, "fromTemplate": {"from_template": "1" * 24},
           "search": {"search": "flo"}}


@pytest.mark.parametrize("scope", [("alice", "acme"), None], ids=["owner-scoped", "admin"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_every_listing_and_its_count_use_an_index(server: FlowStore, name: str,
                                                  scope: tuple[str, ...] | None) -> None:
    for number in range(20):
        server.insert(flow(owners=(("alice", "acme"), ("bob",))[number % 2], name=f"n{number}"))
    for field in queries.SORT_FIELDS:
        for descending in (False, True):
            query = ListQuery(**FILTERS[name], sort_field=field, sort_descending=descending)
            find = queries.listing(query, scope)
            assert index_used(server.explain(find, limit=10)) == find.hint
            assert index_used(server.explain(find, count=True)) == find.hint


def test_owner_removal_reads_the_owner_index(server: FlowStore) -> None:
    stored = server.insert(flow())
    assert index_used(server.explain(queries.owned_by("alice"))).startswith("owner_")
    change = queries.by_id(stored["_id"], deletedAt=None, **{"owners.id": {"$in": ["alice"]}},
                           owners={"$size": 1}, status={"$in": ["active"]})
    assert index_used(server.explain(change, update={"$pull": {"owners": {"id": "alice"}}})) \
        == "_id_"


def test_metrics_counts_per_status_use_an_index(server: FlowStore) -> None:
    server.insert(flow())
    for status in STATUSES:
        assert index_used(server.explain(queries.status_count(status), count=True)) \
            == "status_lifecycle"


# ----------------------------------------------------------------------------- writes


def test_every_change_by_id_reads_the_id_index(server: FlowStore) -> None:
    stored = server.insert(flow(outbox=[{"eventId": "e", "storedAt": utcnow()}]))
    flow_id = stored["_id"]
    preconditions = queries.by_id(flow_id, deletedAt=None, status={"$in": ["inactive"]},
                                  revision=1, **{"owners.id": {"$in": ["alice"]}})
    for find, update in (
        (preconditions, {"$set": {"name": "x"}, "$inc": {"revision": 1}}),
        (queries.by_id(flow_id), {"$pull": {"outbox": {"eventId": "e"}}}),
        (queries.by_id(flow_id), {"$pull": {"historyOutbox": {"entryId": {"$in": ["h"]}}}}),
    ):
        assert index_used(server.explain(find, update=update)) == "_id_", find
    gone = queries.by_id(flow_id, deletedAt={"$ne": None}, outbox={"$size": 0})
    assert index_used(server.explain(gone)) == "_id_"
    assert index_used(server.explain(gone, remove=True)) == "_id_"


def test_a_relays_batch_is_leased_read_and_released_through_the_id_index(
    server: FlowStore,
) -> None:
    """The batch's update_many filters are explained as finds: the server plans them alike
    (SecantusDB's explain of an update statement reports no plan)."""
    ids = [server.insert(flow(outbox=[{"eventId": str(n), "storedAt": utcnow()}]))["_id"]
           for n in range(3)]
    now = utcnow()
    for find in (queries.by_ids(ids, **queries.claimable(now).filter),  # lease
                 queries.by_ids(ids, relayLeaseOwner="r", relayLeaseUntil=now),  # read back
                 queries.by_ids(ids, relayLeaseOwner="r")):  # release
        assert index_used(server.explain(find)) == "_id_", find


# ----------------------------------------------------------------------------- background scans


def test_the_relay_scan_never_examines_flows_with_nothing_pending(server: FlowStore) -> None:
    for number in range(5):
        server.insert(flow(outbox=[{"eventId": f"e{number}", "storedAt": utcnow()}]))

    def scan() -> dict:
        return server.explain(queries.claimable(utcnow()), limit=100)

    assert index_used(scan()) == "outbox_pending"
    assert index_used(server.explain(queries.pending())) == "outbox_pending"  # backlog gauge
    before = examined(scan())
    for number in range(200):
        server.insert(flow(name=f"idle {number}"))
    assert examined(scan()) == before
    assert before[1] <= 5


def test_the_sweep_for_history_left_pending_never_examines_flows_with_none(
        server: FlowStore) -> None:
    long_ago = utcnow() - timedelta(minutes=5)
    for number in range(5):
        server.insert(flow(historyOutbox=[{"entryId": f"h{number}", "at": long_ago}]))

    def scan() -> dict:
        return server.explain(queries.unrecorded(utcnow(), utcnow()), limit=100)

    assert index_used(scan()) == "history_pending"
    before = examined(scan())
    for number in range(200):
        server.insert(flow(name=f"recorded {number}"))
    assert examined(scan()) == before
    assert before[1] <= 5


def test_the_reconciler_scan_never_examines_flows_that_are_not_overdue(
    server: FlowStore,
) -> None:
    now = utcnow()
    for _ in range(3):
        server.insert(flow(status="starting", statusChangedAt=now - timedelta(hours=1)))

    def scan() -> dict:
        return server.explain(queries.overdue("starting", now - timedelta(minutes=2), 0),
                              limit=100)

    assert index_used(scan()) == "status_lifecycle"
    before = examined(scan())
    for number in range(100):
        server.insert(flow(status=STATUSES[number % 4], statusChangedAt=now))  # recent
        server.insert(flow(status="active", statusChangedAt=now - timedelta(hours=1)))
        server.insert(flow(status="starting", statusRetries=1,
                           statusChangedAt=now - timedelta(hours=1)))
    assert examined(scan()) == before
    assert before[1] <= 3
