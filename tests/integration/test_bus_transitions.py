"""Every row of the lifecycle transition table, over HTTP and through the real broker."""

from __future__ import annotations

import pytest
from bson import ObjectId

from flow_repository.domain import flow as domain
from support import eventually

pytestmark = pytest.mark.integration


def test_transition_table_is_the_one_tested_here():
    """Guards the rows below: a changed table must come with changed integration tests."""
    rows = {t.name: (t.sources, t.target, t.event, t.reason) for t in (
        domain.START, domain.STOP, domain.STARTED, domain.STOPPED, domain.FAILED,
        domain.ORPHANED, domain.START_RETRY, domain.START_GIVE_UP, domain.STOP_RETRY,
        domain.STOP_GIVE_UP)}
    assert rows == {
        "start": (("inactive",), "starting", "flow.starting", "start requested"),
        "stop": (("active", "starting"), "stopping", "flow.stopping", "stop requested"),
        "flow.started": (("starting",), "active", None, "orchestrator reported started"),
        "flow.stopped": (("stopping", "active"), "inactive", None,
                         "orchestrator reported stopped"),
        "flow.failed": (("starting", "active"), "stopping", "flow.stopping",
                        "orchestrator reported failure"),
        "orphaned": (("starting", "active"), "stopping", "flow.stopping",
                     "all owners were deleted"),
        "start retry": (("starting",), "starting", "flow.starting",
                        "start timed out, command re-sent"),
        "start give-up": (("starting",), "inactive", "flow.stopping", "start timed out"),
        "stop retry": (("stopping",), "stopping", "flow.stopping",
                       "stop timed out, command re-sent"),
        "stop give-up": (("stopping",), "inactive", None, "stop timed out"),
    }


# ----------------------------------------------------------------------------- HTTP commands


@pytest.mark.parametrize(("source", "action", "target", "event"), [
    ("inactive", "start", "starting", "flow.starting"),
    ("active", "stop", "stopping", "flow.stopping"),
    ("starting", "stop", "stopping", "flow.stopping"),
])
def test_allowed_command_changes_status_and_publishes(driver, listener, source, action,
                                                      target, event):
    bus = listener(event)
    flow_id = driver.bring_to(source)
    before = driver.store.raw(ObjectId(flow_id))

    answer = driver.command(flow_id, action)

    assert answer == {"data": {"id": flow_id, "status": target}, "meta": {}}
    flow = driver.get(flow_id)
    assert flow["status"] == target
    assert flow["revision"] == before["revision"] + 1
    assert flow["statusReason"] == f"{action} requested"
    assert flow["statusChangedAt"] >= flow["createdAt"]
    [message] = bus.wait(event, flow_id)
    assert message.payload["status"] == target
    assert message.payload["id"] == flow_id
    assert message.payload["statusReason"] == f"{action} requested"


@pytest.mark.parametrize(("source", "action"), [
    ("starting", "start"),
    ("active", "start"),
    ("stopping", "start"),
    ("inactive", "stop"),
    ("stopping", "stop"),
])
def test_refused_command_answers_409_with_the_current_status(driver, listener, source, action):
    bus = listener()
    flow_id = driver.bring_to(source)
    before = driver.store.raw(ObjectId(flow_id))

    response = driver.client.post(f"/flows/{flow_id}/{action}", headers=driver.headers)

    assert response.status_code == 409
    [error] = response.get_json()["errors"]
    assert error["code"] == 409
    assert f"its status is {source}" in error["message"]
    after = driver.store.raw(ObjectId(flow_id))
    assert after["status"] == source
    assert after["revision"] == before["revision"]
    driver.barrier()
    expected = {"inactive": ["flowrepo.flow.created"],
                "starting": ["flowrepo.flow.created", "flow.starting"],
                "active": ["flowrepo.flow.created", "flow.starting"],
                "stopping": ["flowrepo.flow.created", "flow.starting", "flow.stopping"]}[source]
    eventually(lambda: not driver.store.raw(ObjectId(flow_id))["outbox"])
    assert [m.routing_key for m in bus.events(flow_id=flow_id)] == expected


# ----------------------------------------------------------------------------- orchestrator reports


@pytest.mark.parametrize(("source", "report", "target", "event"), [
    ("starting", "flow.started", "active", None),
    ("stopping", "flow.stopped", "inactive", None),
    ("active", "flow.stopped", "inactive", None),
    ("starting", "flow.failed", "stopping", "flow.stopping"),
    ("active", "flow.failed", "stopping", "flow.stopping"),
])
def test_allowed_report_changes_status(driver, listener, source, report, target, event):
    bus = listener("flow.starting", "flow.stopping")
    flow_id = driver.bring_to(source)
    before = driver.store.raw(ObjectId(flow_id))
    eventually(lambda: not driver.store.raw(ObjectId(flow_id))["outbox"])
    published_before = len(bus.events(flow_id=flow_id))

    driver.report(report, flow_id)

    after = driver.wait_status(flow_id, target)
    assert after["revision"] == before["revision"] + 1
    reasons = {"flow.started": "orchestrator reported started",
               "flow.stopped": "orchestrator reported stopped",
               "flow.failed": "orchestrator reported failure"}
    assert after["statusReason"] == reasons[report]
    assert driver.get(flow_id)["statusReason"] == reasons[report]
    assert after["statusChangedAt"] > before["statusChangedAt"]
    if event is None:
        driver.barrier()
        eventually(lambda: not driver.store.raw(ObjectId(flow_id))["outbox"])
        assert len(bus.events(flow_id=flow_id)) == published_before
    else:
        [message] = bus.wait(event, flow_id)
        assert len(bus.events(flow_id=flow_id)) == published_before + 1
        assert message.payload["id"] == flow_id
        assert message.payload["status"] == "stopping"
        assert message.payload["statusReason"] == "orchestrator reported failure"


@pytest.mark.parametrize(("source", "report"), [
    ("active", "flow.started"),     # duplicate
    ("stopping", "flow.started"),   # late
    ("inactive", "flow.started"),
    ("starting", "flow.stopped"),   # late, from an earlier run
    ("inactive", "flow.stopped"),
    ("stopping", "flow.failed"),
    ("inactive", "flow.failed"),
])
def test_report_that_does_not_fit_is_ignored(driver, listener, bus, source, report):
    events = listener("flow.starting", "flow.stopping")
    flow_id = driver.bring_to(source)
    eventually(lambda: not driver.store.raw(ObjectId(flow_id))["outbox"])
    before = driver.store.raw(ObjectId(flow_id))
    published_before = len(events.events(flow_id=flow_id))

    driver.report(report, flow_id)
    driver.barrier()  # the report was handled, and the consumer still consumes

    after = driver.store.raw(ObjectId(flow_id))
    assert after["status"] == source
    assert after["revision"] == before["revision"]
    assert after["statusReason"] == before["statusReason"]
    assert after["outbox"] == []
    assert len(events.events(flow_id=flow_id)) == published_before
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)


@pytest.mark.parametrize("report", ["flow.started", "flow.stopped", "flow.failed"])
def test_report_for_an_unknown_or_deleted_flow_is_ignored(driver, bus, store, report):
    deleted = driver.create()
    assert driver.client.delete(f"/flows/{deleted}", headers=driver.headers).status_code == 200
    unknown = ObjectId()

    driver.report(report, unknown)
    driver.report(report, deleted)
    driver.barrier()

    assert store.raw(unknown) is None
    doc = store.raw(ObjectId(deleted))
    assert doc is None or (doc["status"] == "inactive" and doc["deletedAt"] is not None)
    assert driver.client.get(f"/flows/{deleted}", headers=driver.headers).status_code == 404
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)
    assert bus.queue_state() == (0, 1)


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_started_is_applied_once(driver):
    flow_id = driver.bring_to("starting")
    revision = driver.store.raw(ObjectId(flow_id))["revision"]
    envelope = driver.bus.envelope("flow.started", flow_id)

    driver.bus.publish("flow.started", body=envelope)
    driver.bus.publish("flow.started", body=envelope)
    driver.barrier()

    after = driver.store.raw(ObjectId(flow_id))
    assert after["status"] == "active"
    assert after["revision"] == revision + 1


def test_duplicate_failed_publishes_one_stopping(driver, listener):
    events = listener("flow.stopping")
    flow_id = driver.bring_to("active")
    revision = driver.store.raw(ObjectId(flow_id))["revision"]
    envelope = driver.bus.envelope("flow.failed", flow_id)

    for _ in range(3):
        driver.bus.publish("flow.failed", body=envelope)
    driver.barrier()

    after = driver.store.raw(ObjectId(flow_id))
    assert after["status"] == "stopping"
    assert after["revision"] == revision + 1
    eventually(lambda: not driver.store.raw(ObjectId(flow_id))["outbox"])
    assert len(events.events("flow.stopping", flow_id)) == 1
