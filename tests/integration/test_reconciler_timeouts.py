"""The reconciler's rows: overdue start/stop commands are re-sent once, then given up."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from bson import ObjectId

from support import eventually

pytestmark = pytest.mark.integration

TIMEOUT = 0.3


def reconciling(deploy, **timeouts):
    """The running service with a quick reconciler: on a real MongoDB, a worker process's."""
    return deploy(reconcile_interval_seconds=0.1, **timeouts)


def reconciler_barrier(driver, events, command: str) -> None:
    """Return once the reconciler has looked at every flow well after this call.

    A flow whose ``command`` ("start" or "stop") is issued now is re-sent and then given up
    on only by reconciler passes made one and two timeouts later; those passes looked at
    every other flow too.
    """
    status = {"start": "starting", "stop": "stopping"}[command]
    flow_id = driver.bring_to(status)
    driver.wait_status(flow_id, "inactive")
    events.wait(f"flow.{status}", flow_id, count=2)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_stuck_start_is_resent_once_then_given_up(deploy, drive, listener):
    events = listener("flow.starting", "flow.stopping")
    driver = drive(reconciling(deploy, start_timeout_seconds=TIMEOUT, stop_timeout_seconds=60.0))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    requested = driver.get(flow_id)
    assert requested["statusReason"] == "start requested"

    first, second = events.wait("flow.starting", flow_id, count=2)
    assert first.payload["statusReason"] == "start requested"
    assert second.payload["status"] == "starting"
    assert second.payload["statusReason"] == "start timed out, command re-sent"
    assert second.payload["startedBy"] == "user-1"
    assert second.event_id != first.event_id

    gave_up = eventually(lambda: (flow := driver.get(flow_id))["status"] == "inactive" and flow,
                         timeout=15)
    assert gave_up["statusReason"] == "start timed out"
    assert when(gave_up["statusChangedAt"]) - when(requested["statusChangedAt"]) \
        >= timedelta(seconds=2 * TIMEOUT)
    [stopping] = events.wait("flow.stopping", flow_id)
    assert stopping.payload["id"] == flow_id
    assert stopping.payload["status"] == "inactive"
    assert stopping.payload["statusReason"] == "start timed out"
    # requested, re-sent, given up: two writes after the request and no other
    assert driver.store.raw(ObjectId(flow_id))["revision"] == requested["revision"] + 2

    reconciler_barrier(driver, events, "start")  # nothing more happens to an inactive flow
    assert driver.get(flow_id)["status"] == "inactive"
    assert len(events.events("flow.starting", flow_id)) == 2
    assert len(events.events("flow.stopping", flow_id)) == 1
    assert driver.store.raw(ObjectId(flow_id))["revision"] == requested["revision"] + 2


def test_stuck_stop_is_resent_once_then_given_up(deploy, drive, listener):
    events = listener("flow.starting", "flow.stopping")
    driver = drive(reconciling(deploy, start_timeout_seconds=60.0, stop_timeout_seconds=TIMEOUT))
    flow_id = driver.bring_to("active")
    driver.command(flow_id, "stop")
    requested = driver.get(flow_id)
    assert requested["statusReason"] == "stop requested"

    first, second = events.wait("flow.stopping", flow_id, count=2)
    assert first.payload["statusReason"] == "stop requested"
    assert second.payload["status"] == "stopping"
    assert second.payload["statusReason"] == "stop timed out, command re-sent"
    assert second.event_id != first.event_id

    gave_up = eventually(lambda: (flow := driver.get(flow_id))["status"] == "inactive" and flow,
                         timeout=15)
    assert gave_up["statusReason"] == "stop timed out"
    assert when(gave_up["statusChangedAt"]) - when(requested["statusChangedAt"]) \
        >= timedelta(seconds=2 * TIMEOUT)
    assert driver.store.raw(ObjectId(flow_id))["revision"] == requested["revision"] + 2

    reconciler_barrier(driver, events, "stop")
    assert driver.get(flow_id)["status"] == "inactive"
    assert len(events.events("flow.stopping", flow_id)) == 2  # give-up announces nothing
    assert len(events.events("flow.starting", flow_id)) == 1
    assert driver.store.raw(ObjectId(flow_id))["revision"] == requested["revision"] + 2


def test_answered_commands_are_left_alone(deploy, drive, listener):
    events = listener("flow.starting", "flow.stopping")
    # timeouts long enough for bring_to("active") to finish well within them
    timeout = 2.0
    driver = drive(reconciling(deploy, start_timeout_seconds=timeout,
                               stop_timeout_seconds=timeout))
    active = driver.bring_to("active")
    inactive = driver.create()
    revision = driver.store.raw(ObjectId(active))["revision"]

    reconciler_barrier(driver, events, "start")  # well past both timeouts for these two

    assert driver.get(active)["status"] == "active"
    assert driver.get(active)["statusReason"] == "orchestrator reported started"
    assert driver.store.raw(ObjectId(active))["revision"] == revision
    assert driver.get(inactive)["status"] == "inactive"
    assert len(events.events("flow.starting", active)) == 1
    assert events.events("flow.stopping", active) == events.events("flow.stopping", inactive) \
        == []


def test_started_after_the_resend_still_counts(deploy, drive, listener):
    """In the running service: on a real MongoDB the reconciler of a worker process."""
    events = listener("flow.starting")
    # a longer timeout, so that the report surely lands between the re-send and the give-up
    driver = drive(deploy(reconcile_interval_seconds=0.1, start_timeout_seconds=3.0,
                          stop_timeout_seconds=60.0))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    events.wait("flow.starting", flow_id, count=2)

    driver.report("flow.started", flow_id)

    flow = driver.wait_status(flow_id, "active")
    assert flow["statusRetries"] == 0
    assert flow["statusReason"] == "orchestrator reported started"
