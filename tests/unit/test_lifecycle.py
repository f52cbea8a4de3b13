"""The lifecycle rules through the real API and service, in process, with no broker.

The transition matrix below is written from the README's table, not from domain.py: every
status crossed with every trigger, checking what is stored afterwards. The reconciler
tests use the fake clock to make flows overdue.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

Headers = Callable[..., dict[str, str]]

OWNER = "matrix-user"  # the flows' only owner (no tenant), so deleting it orphans them
TIMEOUT = 120  # START_TIMEOUT_SECONDS and STOP_TIMEOUT_SECONDS of the test settings

STARTED = ("active", "orchestrator reported started", None)
STOPPED = ("inactive", "orchestrator reported stopped", None)
FAILED = ("stopping", "orchestrator reported failure", "flow.stopping")
ORPHANED = ("stopping", "all owners were deleted", "flow.stopping")
START_REQUESTED = ("starting", "start requested", "flow.starting")
STOP_REQUESTED = ("stopping", "stop requested", "flow.stopping")
START_RESENT = ("starting", "start timed out, command re-sent", "flow.starting")
START_GAVE_UP = ("inactive", "start timed out", "flow.stopping")
STOP_RESENT = ("stopping", "stop timed out, command re-sent", "flow.stopping")
STOP_GAVE_UP = ("inactive", "stop timed out", None)

# (status, statusRetries) -> trigger -> (status, reason, event queued, statusRetries) when
# the trigger applies; "refused" (409), "ignored" (nothing changes) or "owner removed".
# Overdue triggers only act on flows past their deadline, which the test arranges.
REFUSED, IGNORED, OWNER_REMOVED = "refused", "ignored", "owner removed"
MATRIX: dict[tuple[str, int], dict[str, Any]] = {
    ("inactive", 0): {
        "start": (*START_REQUESTED, 0), "stop": REFUSED,
        "flow.started": IGNORED, "flow.stopped": IGNORED, "flow.failed": IGNORED,
        "owners deleted": OWNER_REMOVED, "overdue": IGNORED,
    },
    ("starting", 0): {
        "start": REFUSED, "stop": (*STOP_REQUESTED, 0),
        "flow.started": (*STARTED, 0), "flow.stopped": IGNORED, "flow.failed": (*FAILED, 0),
        "owners deleted": (*ORPHANED, 0), "overdue": (*START_RESENT, 1),
    },
    ("starting", 1): {
        "start": REFUSED, "stop": (*STOP_REQUESTED, 0),
        "flow.started": (*STARTED, 0), "flow.stopped": IGNORED, "flow.failed": (*FAILED, 0),
        "owners deleted": (*ORPHANED, 0), "overdue": (*START_GAVE_UP, 0),
    },
    ("active", 0): {
        "start": REFUSED, "stop": (*STOP_REQUESTED, 0),
        "flow.started": IGNORED, "flow.stopped": (*STOPPED, 0), "flow.failed": (*FAILED, 0),
        "owners deleted": (*ORPHANED, 0), "overdue": IGNORED,
    },
    ("stopping", 0): {
        "start": REFUSED, "stop": REFUSED,
        "flow.started": IGNORED, "flow.stopped": (*STOPPED, 0), "flow.failed": IGNORED,
        "owners deleted": OWNER_REMOVED, "overdue": (*STOP_RESENT, 1),
    },
    ("stopping", 1): {
        "start": REFUSED, "stop": REFUSED,
        "flow.started": IGNORED, "flow.stopped": (*STOPPED, 0), "flow.failed": IGNORED,
        "owners deleted": OWNER_REMOVED, "overdue": (*STOP_GAVE_UP, 0),
    },
}
CELLS = [(state, trigger) for state, row in MATRIX.items() for trigger in row]


class Lifecycle:
    """Moves one flow through the real API (commands) and service (events, reconciler)."""

    def __init__(self, app, store, auth: Headers, clock, flow_body) -> None:
        self.client = app.test_client()
        self.service = app.extensions["flow_repository"].service
        self.store = store
        self.headers = auth(OWNER, None)
        self.clock = clock
        self.flow_body = flow_body

    def raw(self, flow_id: str) -> dict:
        return self.store.raw(ObjectId(flow_id))

    def command(self, flow_id: str, action: str) -> Any:
        return self.client.post(f"/flows/{flow_id}/{action}", headers=self.headers)

    def overdue(self) -> int:
        self.clock.now += timedelta(seconds=TIMEOUT + 1)
        return self.service.reconcile()

    def flow_in(self, status: str, retries: int) -> str:
        response = self.client.post("/flows", json=self.flow_body(), headers=self.headers)
        assert response.status_code == 201
        flow_id = response.get_json()["data"]["id"]
        path = {"inactive": [], "starting": ["start"], "active": ["start", "flow.started"],
                "stopping": ["start", "flow.started", "stop"]}[status]
        for step in path + ["overdue"] * retries:
            answer = self.trigger(flow_id, step)
            if isinstance(answer, str):  # an orchestrator report
                assert "ignored" not in answer, (step, answer)
            else:  # an HTTP status, or how many flows the reconciler moved
                assert answer in (200, 1), (step, answer)
        raw = self.raw(flow_id)
        assert (raw["status"], raw.get("statusRetries", 0)) == (status, retries)
        return flow_id

    def trigger(self, flow_id: str, name: str) -> Any:
        if name in ("start", "stop"):
            return self.command(flow_id, name).status_code
        if name.startswith("flow."):
            return self.service.apply_status_event(name, {"id": flow_id})
        if name == "owners deleted":
            return self.service.remove_owner(OWNER)
        assert name == "overdue"
        return self.overdue()


@pytest.fixture
def lifecycle(app, store, auth: Headers, clock, flow_body) -> Lifecycle:
    return Lifecycle(app, store, auth, clock, flow_body)


@pytest.mark.parametrize(("state", "trigger"), CELLS, ids=[f"{s}/{r}-{t}" for (s, r), t in CELLS])
def test_transition_matrix(lifecycle: Lifecycle, state: tuple[str, int], trigger: str) -> None:
    flow_id = lifecycle.flow_in(*state)
    before = lifecycle.raw(flow_id)
    answer = lifecycle.trigger(flow_id, trigger)
    after = lifecycle.raw(flow_id)
    expected = MATRIX[state][trigger]

    if expected == REFUSED:
        assert answer == 409
        assert after == before
    elif expected == IGNORED:
        if trigger.startswith("flow."):
            assert "ignored" in answer, answer
        assert after == before
    elif expected == OWNER_REMOVED:
        assert after["owners"] == []
        assert {key: value for key, value in after.items()
                if key not in ("owners", "revision", "updatedAt")} \
            == {key: value for key, value in before.items()
                if key not in ("owners", "revision", "updatedAt")}
    else:
        status, reason, event, retries = expected
        if trigger in ("start", "stop"):
            assert answer == 200
        assert after["status"] == status
        assert after["statusReason"] == reason
        assert after.get("statusRetries", 0) == retries
        assert after["revision"] == before["revision"] + 1
        assert after["statusChangedAt"] > before["statusChangedAt"]
        queued = after["outbox"][len(before["outbox"]):]
        assert after["outbox"][:len(before["outbox"])] == before["outbox"]
        if event is None:
            assert queued == []
        else:
            [queued_event] = queued
            assert queued_event["name"] == event
            assert queued_event["flowOverrides"]["status"] == status
            assert queued_event["flowOverrides"]["statusReason"] == reason


@pytest.mark.parametrize("name", ["flow.started", "flow.stopped", "flow.failed"])
def test_a_repeated_orchestrator_report_changes_nothing_the_second_time(
        lifecycle: Lifecycle, name: str) -> None:
    flow_id = lifecycle.flow_in("active" if name != "flow.started" else "starting", 0)
    if name == "flow.stopped":
        lifecycle.trigger(flow_id, "stop")
    assert "ignored" not in lifecycle.trigger(flow_id, name)
    once = lifecycle.raw(flow_id)
    assert "ignored" in lifecycle.trigger(flow_id, name)
    assert lifecycle.raw(flow_id) == once


def test_a_late_started_does_not_revive_a_flow_being_stopped(lifecycle: Lifecycle) -> None:
    flow_id = lifecycle.flow_in("starting", 0)
    assert lifecycle.command(flow_id, "stop").status_code == 200  # stop while starting
    stopping = lifecycle.raw(flow_id)
    assert "ignored" in lifecycle.trigger(flow_id, "flow.started")  # the start's late answer
    assert lifecycle.raw(flow_id) == stopping


# ----------------------------------------------------------------------------- reconciler


class StaleSnapshot:
    """Serves every reconciler the overdue flows as first read, as if all read at once."""

    def __init__(self, store, monkeypatch: pytest.MonkeyPatch) -> None:
        self._read = store.stuck
        self._snapshots: dict[tuple[str, int], list[dict]] = {}
        monkeypatch.setattr(store, "stuck", self.stuck)

    def stuck(self, status: str, changed_before, *, retries: int, limit: int = 100):
        key = (status, retries)
        if key not in self._snapshots:
            self._snapshots[key] = self._read(status, changed_before, retries=retries,
                                              limit=limit)
        return [dict(flow) for flow in self._snapshots[key]]


def names(outbox: list[dict]) -> list[str]:
    return [event["name"] for event in outbox]


def test_two_reconcilers_from_one_stale_snapshot_resend_a_start_once(
        lifecycle: Lifecycle, build_app, store, clock, monkeypatch) -> None:
    flow_id = lifecycle.flow_in("starting", 0)
    before = lifecycle.raw(flow_id)
    other = build_app().extensions["flow_repository"].service  # another process
    StaleSnapshot(store, monkeypatch)
    clock.now += timedelta(seconds=TIMEOUT + 1)

    assert lifecycle.service.reconcile() == 1
    assert other.reconcile() == 0  # its snapshot names a revision that has moved

    after = lifecycle.raw(flow_id)
    assert after["revision"] == before["revision"] + 1
    assert after["statusRetries"] == 1
    assert after["statusReason"] == "start timed out, command re-sent"
    assert names(after["outbox"]) == names(before["outbox"]) + ["flow.starting"]


def test_a_reconciler_with_a_stale_snapshot_leaves_a_restarted_flow_alone(
        lifecycle: Lifecycle, store, clock, monkeypatch) -> None:
    flow_id = lifecycle.flow_in("starting", 0)
    snapshot = StaleSnapshot(store, monkeypatch)
    clock.now += timedelta(seconds=TIMEOUT + 1)
    snapshot.stuck("starting", clock(), retries=0)  # read while the flow was overdue ...
    for step in ("stop", "flow.stopped", "start"):  # ... then it was stopped and restarted
        lifecycle.trigger(flow_id, step)
    restarted = lifecycle.raw(flow_id)
    assert restarted["status"] == "starting"

    assert lifecycle.service.reconcile() == 0  # same status, but not the same start
    assert lifecycle.raw(flow_id) == restarted


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("action", ["start", "stop"])
def test_starting_or_stopping_several_flows_needs_the_control_permission(
        client, auth: Headers, lifecycle: Lifecycle, error_messages, action: str) -> None:
    flows = [lifecycle.flow_in("inactive" if action == "start" else "active", 0)
             for _ in range(2)]
    before = [lifecycle.raw(flow_id) for flow_id in flows]
    reader = auth(OWNER, None, permissions=["flows.read"])

    response = client.post(f"/flows/multiple/{action}", json=flows, headers=reader)

    error_messages(response, 403)
    assert [lifecycle.raw(flow_id) for flow_id in flows] == before
    allowed = client.post(f"/flows/multiple/{action}", json=flows,
                          headers=auth(OWNER, None, permissions=["flows.control"]))
    assert allowed.status_code == 200, allowed.get_json()
