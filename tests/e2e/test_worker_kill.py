"""The production topology losing a worker: two ``worker`` processes and two API workers on
one database (MongoDB or the embedded SQLite file), the active worker SIGKILLed while each
flow's reports are in flight together."""

from __future__ import annotations

import signal
import threading

import pytest
from bson import ObjectId

from flow_repository.domain.flow import STATUSES
from support import Bus, Driver, Listener, bearer, connect, eventually

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

FLOWS = 200
BATCH = 100  # BULK_MAX_ITEMS


def all_in(store, status: str, count: int = FLOWS) -> bool:
    return store.count_by_status(STATUSES).get(status, 0) == count


def applied(workers: list) -> float:
    """Reports the ``workers`` have applied so far (only the active consumer applies any)."""
    total = 0.0
    for worker in workers:
        for line in worker.get("/metrics").text.splitlines():
            if line.startswith("flow_repository_events_consumed_total{") and \
                    'outcome="applied"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def distinct_commands(events: Listener, flow_id: str) -> list[tuple[str, str]]:
    """(name, eventId) of the commands about ``flow_id`` in arrival order, re-publications
    of one event (at least once: same eventId) counted once."""
    seen: list[tuple[str, str]] = []
    for message in events.events(flow_id=flow_id):
        if (message.name, message.event_id) not in seen:
            seen.append((message.name, message.event_id))
    return seen


def test_a_worker_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
        deploy, iam: FakeIam, bus: Bus, listener, settings, shared_store, flow_body) -> None:
    events = listener("flow.starting", "flow.stopping")
    # a short relay lease, so that the flows the killed worker's relay held are taken over soon
    deployment = deploy(workers=2, RELAY_LEASE_SECONDS="2")
    driver = Driver(deployment, bus, bearer(iam.grant("kill-user", "tenant-k")), shared_store,
                    flow_body)
    client = deployment.client

    flows: list[str] = []
    for first in range(0, FLOWS, BATCH):
        created = client.post("/flows", headers=driver.headers,
                              json=[flow_body(f"Flow {n}") for n in range(first, first + BATCH)])
        assert created.status_code == 201, created.get_json()
        flows += [item["id"] for item in created.get_json()["data"]]  # {errors} has no id
    for first in range(0, FLOWS, BATCH):
        started = client.post("/flows/multiple/start", headers=driver.headers,
                              json=flows[first:first + BATCH])
        assert started.status_code == 200, started.get_json()
        assert all(item["data"]["status"] == "starting" for item in started.get_json())
    started_revision = {flow_id: shared_store.raw(ObjectId(flow_id))["revision"]
                        for flow_id in flows}

    # One stream: each flow's three reports back to back, all in flight while the active
    # worker dies. flow.failed moves a flow to stopping and queues a flow.stopping, which
    # the relays (two API workers, two workers) publish; flow.stopped then ends it.
    def orchestrate() -> None:  # on a connection of its own, while the worker dies
        reporter = Bus(settings, connect(settings))
        for flow_id in flows:
            reporter.publish("flow.started", flow_id)
            reporter.publish("flow.failed", flow_id)
            reporter.publish("flow.stopped", flow_id)

    reporting = threading.Thread(target=orchestrate, daemon=True)
    reporting.start()
    eventually(lambda: applied(deployment.workers) > 0, 60, interval=0.01,
               message="a worker consuming the reports")
    assert bus.consumers() == 2
    [victim] = [worker for worker in deployment.workers if applied([worker]) > 0]
    survivor = next(worker for worker in deployment.workers if worker is not victim)
    victim.process.send_signal(signal.SIGKILL)
    assert victim.process.wait(10) == -signal.SIGKILL
    # counted after the kill: reports still unapplied then prove it came mid-stream
    assert shared_store.count_by_status(STATUSES).get("inactive", 0) < FLOWS, \
        "the kill must come mid-stream"

    reporting.join(120)
    eventually(lambda: all_in(shared_store, "inactive"), 120, interval=0.2,
               message="every report applied, the killed worker's unacked ones too")
    eventually(lambda: bus.consumers() == 1, 30, message="only the survivor consumes")

    # Nothing applied twice: after its start, each flow changed exactly three times
    # (started, failed, stopped).
    for flow_id in flows:
        flow = shared_store.raw(ObjectId(flow_id))
        assert flow["revision"] == started_revision[flow_id] + 3, flow
        assert flow["statusReason"] == "orchestrator reported stopped"
    # Nothing lost, nothing published twice as a new event, per-flow order kept: one
    # flow.starting, then one flow.stopping (the failure's), for every flow.
    def all_published() -> bool:
        return all(len(distinct_commands(events, flow_id)) >= 2 for flow_id in flows)

    eventually(all_published, 60, interval=0.2, message="every flow.stopping published")
    for flow_id in flows:
        commands = distinct_commands(events, flow_id)
        assert [name for name, _ in commands] == ["flow.starting", "flow.stopping"], commands
    assert {message.payload["statusReason"] for message in events.events("flow.stopping")} \
        == {"orchestrator reported failure"}
    assert bus.queue_state() == (0, 1)
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)
    assert survivor.get("/healthcheck").json()["status"] == "pass"
    assert deployment.api.get("/healthcheck").json()["status"] == "pass"
