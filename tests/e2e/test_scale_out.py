"""The topology the manifests ship, on one database: two API processes and three workers,
with the reports and changes of one flow in flight together."""

from __future__ import annotations

import pytest
from bson import ObjectId

from support import Bus, Listener, bearer, eventually, statuses

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

FLOWS = 100
PATCHES = 30
BATCH = 100  # BULK_MAX_ITEMS


@pytest.fixture
def topology(deploy, settings):
    if settings.embedded and settings.embedded_database == ":memory:":
        pytest.skip("several processes need a database file or a MongoDB to share")
    return deploy(workers=3, apis=2)


def create_and_start(topology, headers: dict[str, str], flow_body, count: int) -> list[str]:
    """``count`` flows created through the first API process and started through the second."""
    first, second = topology.clients
    flows: list[str] = []
    for batch in range(0, count, BATCH):
        created = first.post("/flows", headers=headers, json=[
            flow_body(f"Flow {n}") for n in range(batch, min(batch + BATCH, count))])
        assert created.status_code == 201, created.get_json()
        flows += [item["id"] for item in created.get_json()["data"]]
    for batch in range(0, count, BATCH):
        started = second.post("/flows/multiple/start", headers=headers,
                              json=flows[batch:batch + BATCH])
        assert started.status_code == 200, started.get_json()
        assert {item["data"]["status"] for item in started.get_json()} == {"starting"}
    return flows


def test_back_to_back_reports_end_every_flow_where_the_last_report_says(
        topology, iam: FakeIam, bus: Bus, shared_store, flow_body) -> None:
    headers = bearer(iam.grant("scale-user", "tenant-s"))
    flows = create_and_start(topology, headers, flow_body, 2 * FLOWS)
    stopped, failed = flows[:FLOWS], flows[FLOWS:]
    # Each flow's two reports are in flight together, the flows interleaved.
    for stop_id, fail_id in zip(stopped, failed, strict=True):
        bus.publish("flow.started", stop_id)
        bus.publish("flow.started", fail_id)
        bus.publish("flow.stopped", stop_id)
        bus.publish("flow.failed", fail_id)

    def settled() -> bool:
        assert statuses(shared_store, stopped) == {"inactive": FLOWS}
        assert statuses(shared_store, failed) == {"stopping": FLOWS}
        return True

    eventually(settled, 120, interval=0.5, message="every flow where its last report says")
    for flow_id in failed:
        assert shared_store.raw(ObjectId(flow_id))["statusReason"] == "orchestrator reported failure"
    assert bus.queue_state()[0] == 0
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)


def test_rapid_patches_through_both_apis_reach_the_broker_in_revision_order(
        topology, iam: FakeIam, listener, shared_store, flow_body) -> None:
    headers = bearer(iam.grant("patch-user", "tenant-p"))
    events: Listener = listener("flowrepo.flow.created", "flowrepo.flow.modified")
    first, second = topology.clients
    created = first.post("/flows", headers=headers, json=flow_body("Patched"))
    assert created.status_code == 201, created.get_json()
    flow_id = created.get_json()["data"]["id"]

    for n in range(PATCHES):  # each answered before the next, alternating API processes
        client = (first, second)[n % 2]
        patched = client.patch(f"/flows/{flow_id}", headers=headers,
                               json={"description": f"change {n}"})
        assert patched.status_code == 200, patched.get_json()
        assert patched.get_json()["data"]["revision"] == n + 2

    changes = eventually(lambda: (found := events.events(flow_id=flow_id))
                         and len({m.event_id for m in found}) == PATCHES + 1 and found,
                         60, interval=0.2, message="every change published")
    revisions = []
    for message in changes:  # a re-publication (at least once) repeats its revision
        revision = message.body["headers"]["revision"]
        if not revisions or revisions[-1] != revision:
            revisions.append(revision)
    assert revisions == list(range(1, PATCHES + 2))

    history = first.get(f"/flows/{flow_id}/revisions?page[size]=100", headers=headers)
    assert history.status_code == 200, history.get_json()
    recorded = sorted(entry["revision"] for entry in history.get_json()["data"])
    assert recorded == list(range(1, PATCHES + 2))
    assert shared_store.raw(ObjectId(flow_id)).get("outbox") == []
