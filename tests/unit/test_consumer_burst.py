"""Bursts of status reports: the consumer applies what one socket read delivered together
(one transaction on SQLite) and acknowledges it once committed; a failure undoes the burst.

The consumer runs on the real service and store here, with a fake channel in place of
pika's: the bursts are built by hand, so that what a burst holds is certain.
"""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import Store, StoreUnavailable, utcnow
from flow_repository.domain import flow as domain
from flow_repository.entrypoints.consumer import StatusConsumer
from flow_repository.server.metrics import Metrics
from flow_repository.services import FlowService
from flow_repository.settings import Settings

OWNER = Principal(sub="burst-user", tenant="burst-tenant", permissions=frozenset(),
                  is_admin=False)


class RecordingRelay:
    """This process's relay as the service sees it: leases, and the flows handed over."""

    def __init__(self) -> None:
        self.handed: list[dict[str, Any]] = []
        self._step = 0

    def lease(self) -> tuple[str, Any]:
        self._step += 1
        return "burst-relay", utcnow() + timedelta(seconds=30, milliseconds=self._step)

    def hand_off(self, flow: Any, lease: Any) -> None:
        self.handed.append(dict(flow))


class QueuedAcks:
    """pika's underlying channel, as far as acks go: queued, sent by the loop's next turn."""

    def __init__(self, channel: FakeChannel) -> None:
        self._channel = channel

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._channel.acked.append((delivery_tag, multiple))


class FakeChannel:
    """What the consumer does on its channel: acknowledgements and dead-letter copies."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, bool]] = []
        self.sent_at_once: list[int] = []  # acks the blocking channel flushed as it was told
        self.dead_lettered: list[bytes] = []
        self._impl = QueuedAcks(self)  # pika's underlying channel: acks only queued there

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked.append((delivery_tag, multiple))
        self.sent_at_once.append(delivery_tag)

    def basic_publish(self, *, exchange: str, routing_key: str, body: bytes,
                      properties: Any) -> None:
        self.dead_lettered.append(body)


def report(name: str, flow_id: str) -> bytes:
    return json.dumps({"headers": {"name": name, "createdAt": 1,
                                   "serviceName": "component-orchestrator"},
                       "payload": {"id": flow_id}}).encode()


@pytest.fixture
def parts(settings: Settings, store: Store, flow_body) -> SimpleNamespace:
    relay = RecordingRelay()
    service = FlowService(store, timeouts=domain.Timeouts(120, 120), relay=relay)
    consumer = StatusConsumer(settings, service, Metrics())
    consumer._connection = SimpleNamespace(sleep=lambda seconds: None)  # retries' pauses
    flows = []
    for number in range(3):
        flow_id = service.create(OWNER, flow_body(f"burst {number}")).flow["id"]
        service.start(OWNER, flow_id)
        flows.append(flow_id)
    relay.handed.clear()
    return SimpleNamespace(service=service, consumer=consumer, relay=relay, store=store,
                           channel=FakeChannel(), flows=flows)


def deliver(parts: SimpleNamespace, *bodies: tuple[str, bytes],
            traces: dict[int, str] | None = None) -> None:
    """One burst: the messages one read delivered, in order, then applied (``traces``: the
    ``traceparent`` header of some of them, by delivery tag)."""
    for tag, (name, body) in enumerate(bodies, start=1):
        method = SimpleNamespace(delivery_tag=tag, routing_key=name, exchange="bus")
        headers = {"traceparent": traces[tag]} if traces and tag in traces else {}
        properties = SimpleNamespace(headers=headers, content_type="application/json",
                                     message_id=None)
        parts.consumer._on_message(parts.channel, method, properties, body)
    parts.consumer._apply_burst()
    parts.consumer._ack_settled(parts.channel)


def revision(parts: SimpleNamespace, flow_id: str) -> int:
    return parts.store.get(ObjectId(flow_id))["revision"]


def test_a_burst_is_applied_in_order_and_acknowledged_once_written(parts) -> None:
    first, second, third = parts.flows
    before = {flow_id: revision(parts, flow_id) for flow_id in parts.flows}
    deliver(parts,
            ("flow.started", report("flow.started", first)),
            ("flow.started", b"\x00 not JSON"),
            ("flow.started", report("flow.started", second)),
            ("flow.failed", report("flow.failed", second)),  # after its started: applies
            ("flow.started", report("flow.started", str(ObjectId()))))  # unknown: ignored
    assert parts.store.get(ObjectId(first))["status"] == "active"
    assert parts.store.get(ObjectId(second))["status"] == "stopping"
    assert parts.store.get(ObjectId(third))["status"] == "starting"  # not in the burst
    assert revision(parts, first) == before[first] + 1
    assert revision(parts, second) == before[second] + 2
    assert parts.channel.dead_lettered == [b"\x00 not JSON"]
    assert parts.channel.acked[-1] == (5, True)  # every message settled, acked at once
    # the relay was handed each committed write it has work for, in order, once: every
    # one where it records the history; else those that queued an event (flow.stopping)
    handed = [(ObjectId(first), "active"), (ObjectId(second), "active"),
              (ObjectId(second), "stopping")]
    if parts.store.history_with_change:
        handed = handed[-1:]
    assert [(flow["_id"], flow["status"]) for flow in parts.relay.handed] == handed


def test_an_ack_that_frees_the_window_goes_out_at_once_the_rest_at_the_next_turn(
        parts, settings: Settings) -> None:
    """Half the prefetch window settled: acked at once, so the broker sends more while the
    rest is written; what is settled at the end of a turn is queued for the next one."""
    parts.consumer = StatusConsumer(settings.replace(consumer_prefetch=4), parts.service,
                                    Metrics())
    deliver(parts, *[("flow.started", report("flow.started", flow_id))
                     for flow_id in parts.flows])
    assert parts.channel.acked == [(2, True), (3, True)]
    assert parts.channel.sent_at_once == [2]


@pytest.mark.parametrize("failure", [
    RuntimeError("a passing bug"),
    StoreUnavailable(OSError("database away for a moment"), "SQLite"),
], ids=["bug", "database-away"])
def test_a_failure_in_a_burst_undoes_it_and_each_message_is_applied_once(
        parts, failure: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, _ = parts.flows
    before = {flow_id: revision(parts, flow_id) for flow_id in parts.flows}
    apply = parts.service.apply_status_event
    failures = []

    def fails_once_on_second(name: str, payload: Any) -> str:
        if payload.get("id") == second and not failures:
            failures.append(name)
            raise failure
        return apply(name, payload)

    monkeypatch.setattr(parts.service, "apply_status_event", fails_once_on_second)
    deliver(parts,  # reports that queue an event (flow.stopping): each write goes to the relay
            ("flow.failed", report("flow.failed", first)),
            ("flow.failed", report("flow.failed", second)))
    assert failures == ["flow.failed"]
    # applied exactly once each: the undone burst (SQLite) or the idempotent report
    # applied again (MongoDB, where each write stands on its own) adds no revision
    assert revision(parts, first) == before[first] + 1
    assert revision(parts, second) == before[second] + 1
    assert parts.store.get(ObjectId(second))["status"] == "stopping"
    assert parts.channel.dead_lettered == []
    assert parts.channel.acked[-1] == (2, True)
    # no write that was rolled back reached the relay: each flow's handed versions are
    # ones the store holds (or held) at a revision applied once
    handed = [(flow["_id"], flow["revision"]) for flow in parts.relay.handed]
    assert sorted(handed) == sorted({(ObjectId(first), before[first] + 1),
                                     (ObjectId(second), before[second] + 1)})


def test_the_burst_undone_leaves_its_writes_out_of_the_store_on_sqlite(
        parts, monkeypatch: pytest.MonkeyPatch) -> None:
    if not parts.store.atomic_batches:
        pytest.skip("MongoDB applies each write on its own: nothing to undo")
    first, second, _ = parts.flows
    before = revision(parts, first)
    seen_inside = []

    def always_fails(name: str, payload: Any) -> str:
        if payload.get("id") == second:
            seen_inside.append(revision(parts, first))  # the burst's own write, uncommitted
            raise domain.InvalidFlow("never applies")  # not InvalidEvent: a bug, retried
        return apply(name, payload)

    apply = parts.service.apply_status_event
    monkeypatch.setattr(parts.service, "apply_status_event", always_fails)
    parts.consumer._settings = parts.consumer._settings.replace(consumer_max_attempts=2)
    deliver(parts,
            ("flow.started", report("flow.started", first)),
            ("flow.started", report("flow.started", second)))
    assert seen_inside[0] == before + 1  # written inside the burst, then undone ...
    assert revision(parts, first) == before + 1  # ... and applied once on its own
    assert len(parts.channel.dead_lettered) == 1  # the second, after its attempts


def test_each_report_of_a_burst_is_handled_in_its_own_trace(parts) -> None:
    first, second, _ = parts.flows
    trace_ids = ["4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"]
    deliver(parts,
            ("flow.started", report("flow.started", first)),
            ("flow.started", report("flow.started", second)),
            traces={tag: f"00-{trace_id}-00f067aa0ba902b7-01"
                    for tag, trace_id in enumerate(trace_ids, start=1)})
    for flow_id, trace_id in zip((first, second), trace_ids, strict=True):
        flow_id = ObjectId(flow_id)
        entries = parts.store.history.page(flow_id, 1, 100)[0][::-1] \
            if parts.store.history_with_change else parts.store.raw(flow_id)["historyOutbox"]
        [entry] = [entry for entry in entries if entry.get("kind") == "status"][-1:]
        assert entry["traceId"] == trace_id
