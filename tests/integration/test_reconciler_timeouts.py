"""The reconciler's rows: overdue start/stop commands are re-sent once, then given up."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from bson import ObjectId

from .conftest import eventually

pytestmark = pytest.mark.integration

TIMEOUT = 0.3


@pytest.fixture
def passes(store, monkeypatch):
    """Counts reconciler passes (each pass asks the store for stuck flows four times)."""
    calls = {"n": 0}
    lock = threading.Lock()
    original = store.stuck

    def counting(*args, **kwargs):
        with lock:
            calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "stuck", counting)

    def wait_for_more(count: int) -> None:
        """Return after at least ``count`` further complete reconciler passes."""
        target = calls["n"] + 4 * (count + 1)
        eventually(lambda: calls["n"] >= target, timeout=10,
                   message=f"{count} more reconciler passes")

    return wait_for_more


@pytest.fixture
def history(store, monkeypatch):
    """Every status a flow went through, as written: ``history(flow_id)`` -> [(status, reason)].

    The re-sent state lasts only one timeout (0.3 s here); recording the writes makes the
    test independent of catching it with a GET.
    """
    seen: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    original = store.update

    def recording(*args, **kwargs):
        updated = original(*args, **kwargs)
        if updated is not None:
            with lock:
                entry = (str(updated["_id"]), updated["status"], updated.get("statusReason"))
                if not seen or seen[-1] != entry:
                    seen.append(entry)
        return updated

    monkeypatch.setattr(store, "update", recording)

    def of(flow_id: str) -> list[tuple[str, str]]:
        with lock:
            return [(status, reason) for flow, status, reason in seen if flow == flow_id]

    return of


def reconciling_app(make_app, settings, **timeouts):
    return make_app(settings.replace(reconcile_interval_seconds=0.1, **timeouts))


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_stuck_start_is_resent_once_then_given_up(make_app, settings, drive, listener, passes,
                                                   history):
    events = listener("flow.starting", "flow.stopping")
    driver = drive(reconciling_app(make_app, settings, start_timeout_seconds=TIMEOUT,
                                   stop_timeout_seconds=60.0))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    requested = driver.get(flow_id)
    assert requested["statusReason"] == "start requested"

    first, second = events.wait("flow.starting", flow_id, count=2, timeout=5)
    assert second.payload["status"] == "starting"
    assert second.payload["startedBy"] == "user-1"
    assert second.event_id != first.event_id

    gave_up = eventually(lambda: (flow := driver.get(flow_id))["status"] == "inactive" and flow,
                         timeout=5)
    assert gave_up["statusReason"] == "start timed out"
    assert when(gave_up["statusChangedAt"]) - when(requested["statusChangedAt"]) \
        >= timedelta(seconds=2 * TIMEOUT)
    [stopping] = events.wait("flow.stopping", flow_id)
    assert stopping.payload["id"] == flow_id
    assert stopping.payload["status"] == "inactive"
    assert history(flow_id) == [
        ("starting", "start requested"),
        ("starting", "start timed out, command re-sent"),
        ("inactive", "start timed out"),
    ]

    passes(3)  # nothing more happens to an inactive flow
    assert driver.get(flow_id)["status"] == "inactive"
    assert len(events.events("flow.starting", flow_id)) == 2
    assert len(events.events("flow.stopping", flow_id)) == 1
    assert driver.store.raw(ObjectId(flow_id))["revision"] == requested["revision"] + 2


def test_stuck_stop_is_resent_once_then_given_up(make_app, settings, drive, listener, passes,
                                                  history):
    events = listener("flow.starting", "flow.stopping")
    driver = drive(reconciling_app(make_app, settings, start_timeout_seconds=60.0,
                                   stop_timeout_seconds=TIMEOUT))
    flow_id = driver.bring_to("active")
    driver.command(flow_id, "stop")
    requested = driver.get(flow_id)
    assert requested["statusReason"] == "stop requested"

    first, second = events.wait("flow.stopping", flow_id, count=2, timeout=5)
    assert second.payload["status"] == "stopping"
    assert second.event_id != first.event_id

    gave_up = eventually(lambda: (flow := driver.get(flow_id))["status"] == "inactive" and flow,
                         timeout=5)
    assert gave_up["statusReason"] == "stop timed out"
    assert when(gave_up["statusChangedAt"]) - when(requested["statusChangedAt"]) \
        >= timedelta(seconds=2 * TIMEOUT)
    assert history(flow_id)[-3:] == [
        ("stopping", "stop requested"),
        ("stopping", "stop timed out, command re-sent"),
        ("inactive", "stop timed out"),
    ]

    passes(3)
    assert driver.get(flow_id)["status"] == "inactive"
    assert len(events.events("flow.stopping", flow_id)) == 2  # give-up announces nothing
    assert len(events.events("flow.starting", flow_id)) == 1


def test_answered_commands_are_left_alone(make_app, settings, drive, listener, passes):
    events = listener("flow.starting", "flow.stopping")
    driver = drive(reconciling_app(make_app, settings, start_timeout_seconds=TIMEOUT,
                                   stop_timeout_seconds=TIMEOUT))
    active = driver.bring_to("active")
    inactive = driver.create()
    revision = driver.store.raw(ObjectId(active))["revision"]

    passes(int(3 * TIMEOUT / 0.1) + 2)  # well past both timeouts

    assert driver.get(active)["status"] == "active"
    assert driver.get(active)["statusReason"] == "orchestrator reported started"
    assert driver.store.raw(ObjectId(active))["revision"] == revision
    assert driver.get(inactive)["status"] == "inactive"
    assert len(events.events("flow.starting", active)) == 1
    assert events.events("flow.stopping") == []


def test_started_after_the_resend_still_counts(make_app, settings, drive, listener):
    events = listener("flow.starting")
    # a longer timeout, so that the report surely lands between the re-send and the give-up
    driver = drive(reconciling_app(make_app, settings, start_timeout_seconds=1.0,
                                   stop_timeout_seconds=60.0))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    events.wait("flow.starting", flow_id, count=2)

    driver.report("flow.started", flow_id)

    flow = driver.wait_status(flow_id, "active")
    assert flow["statusRetries"] == 0
    assert flow["statusReason"] == "orchestrator reported started"
