"""Poison messages, failing handlers and MongoDB outages as seen by the real consumer."""

from __future__ import annotations

import json
import threading

import pytest
from bson import ObjectId
from pymongo.errors import AutoReconnect

from flow_repository.adapters.store import StoreUnavailable
from support import eventually

pytestmark = pytest.mark.integration


def envelope_without_payload() -> bytes:
    return json.dumps({"headers": {"name": "flow.stopped", "createdAt": 1,
                                   "serviceName": "component-orchestrator"}}).encode()


def test_poison_messages_are_dead_lettered_and_consuming_goes_on(driver, bus, settings):
    flow_id = driver.bring_to("starting")
    bus.bind("flow.exploded")  # a binding the service does not know how to handle
    poison = [
        ("flow.started", bus.publish("flow.started", raw=b"\x00 this is not JSON"),
         "body is not JSON"),
        ("flow.stopped", bus.publish("flow.stopped", raw=envelope_without_payload()),
         "body is not an OIH event: no payload object"),
        ("flow.started", bus.publish("flow.started", raw=b"[1, 2, 3]"),
         "body is not an OIH event: no payload object"),
        ("flow.failed", bus.publish("flow.failed", "not-an-object-id"),
         "event payload names no valid flow id (got 'not-an-object-id')"),
        ("flow.exploded", bus.publish("flow.exploded", flow_id),
         "no handler for routing key 'flow.exploded'"),
        ("iam.user.deleted", bus.publish("iam.user.deleted", body={"payload": {"id": 42}}),
         "an owner id must be a non-empty string (got 42)"),
    ]
    bus.publish("flow.started", flow_id)  # a valid message after them is still applied

    flow = driver.wait_status(flow_id, "active")
    assert flow["statusReason"] == "orchestrator reported started"
    dead = []

    def all_dead_lettered() -> bool:
        dead.extend(bus.dead_letters())
        return len(dead) >= len(poison)

    eventually(all_dead_lettered)
    assert len(dead) == len(poison)
    for message, (name, body, reason) in zip(dead, poison, strict=True):
        headers = message.properties.headers
        assert message.raw == body
        assert headers["x-death-reason"] == reason
        assert headers["x-original-routing-key"] == name
        assert headers["x-original-exchange"] == settings.event_exchange
        assert headers["x-dead-lettered-at"]
        assert message.properties.delivery_mode == 2
    assert bus.queue_state() == (0, 1)
    assert driver.deployment.consumers_alive()
    metrics = driver.deployment.consumer_metrics()
    assert 'flow_repository_events_dead_lettered_total{name="flow.started"} 2.0' in metrics


def test_a_handler_failing_every_time_is_retried_then_dead_lettered(make_app, settings, drive,
                                                                    bus, listener, monkeypatch):
    other_subscriber = listener("flow.started")  # e.g. another service on the event bus
    driver = drive(make_app(settings.replace(consumer_max_attempts=3)))
    service = driver.deployment.runtime.service
    doomed = driver.bring_to("starting")
    original = service.apply_status_event
    calls = []
    lock = threading.Lock()

    def broken(name, payload):
        if payload.get("id") == doomed:
            with lock:
                calls.append(name)
            raise RuntimeError("a bug in the handler")
        return original(name, payload)

    monkeypatch.setattr(service, "apply_status_event", broken)
    raw = bus.publish("flow.started", doomed)

    [dead] = eventually(bus.dead_letters, timeout=20, message="dead-lettered after retries")
    assert calls == ["flow.started"] * 3  # consumer_max_attempts
    assert dead.raw == raw
    headers = dead.properties.headers
    assert headers["x-death-reason"] == "failed 3 times: RuntimeError: a bug in the handler"
    assert headers["x-original-routing-key"] == "flow.started"
    assert headers["x-original-exchange"] == settings.event_exchange
    driver.barrier()  # not an endless loop: the consumer moved on
    assert len(calls) == 3
    assert driver.store.raw(ObjectId(doomed))["status"] == "starting"
    assert bus.queue_state() == (0, 1)
    # the retries stayed inside the service: other subscribers saw the event once
    assert len(other_subscriber.events("flow.started", doomed)) == 1


def test_a_retried_message_keeps_its_place_before_later_events_of_the_flow(
        make_app, settings, drive, bus, monkeypatch):
    driver = drive(make_app(settings.replace(consumer_max_attempts=3)))
    service = driver.deployment.runtime.service
    flow_id = driver.bring_to("starting")
    original = service.apply_status_event
    seen = []

    def fails_once(name, payload):
        if payload.get("id") == flow_id:
            seen.append(name)
            if seen == ["flow.started"]:
                raise RuntimeError("a passing glitch")
        return original(name, payload)

    monkeypatch.setattr(service, "apply_status_event", fails_once)
    bus.publish("flow.started", flow_id)
    bus.publish("flow.stopped", flow_id)
    eventually(lambda: len(seen) == 3, timeout=20, message="both events handled")
    assert seen == ["flow.started", "flow.started", "flow.stopped"]
    # started (on its retry) then stopped: the flow ends inactive, not stuck in starting
    # (waited for: each call is noted before its write)
    driver.wait_status(flow_id, "inactive")
    assert bus.dead_letters() == []


def test_mongodb_unavailable_requeues_instead_of_dead_lettering(make_app, settings, drive, bus,
                                                                monkeypatch):
    # a single attempt allowed: were an outage counted as a failure, it would dead-letter
    driver = drive(make_app(settings.replace(consumer_max_attempts=1)))
    service = driver.deployment.runtime.service
    flow_id = driver.bring_to("starting")
    revision = driver.store.raw(ObjectId(flow_id))["revision"]
    original = service.apply_status_event
    outcomes = []

    def flaky(name, payload):
        if payload.get("id") == flow_id and not outcomes:
            outcomes.append("unavailable")
            raise StoreUnavailable(AutoReconnect("connection refused"))
        if payload.get("id") == flow_id:
            outcomes.append("applied")
        return original(name, payload)

    monkeypatch.setattr(service, "apply_status_event", flaky)
    bus.publish("flow.started", flow_id)

    flow = driver.wait_status(flow_id, "active", timeout=15)
    assert outcomes == ["unavailable", "applied"]
    assert flow["revision"] == revision + 1
    eventually(lambda: bus.queue_state() == (0, 1))
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)


def test_a_dead_lettered_message_replayed_into_the_queue_is_applied(driver, bus, settings):
    flow_id = driver.bring_to("starting")
    bus.publish("flow.started", "not-an-object-id")  # poison: dead-lettered
    [dead] = eventually(bus.dead_letters, timeout=10, message="poison dead-lettered")
    assert dead.properties.headers["x-original-routing-key"] == "flow.started"
    # an operator fixes the payload and replays it straight into the service's queue
    fixed = json.dumps(bus.envelope("flow.started", flow_id)).encode()
    bus.replay(fixed, dead.properties.headers)
    eventually(lambda: driver.store.raw(ObjectId(flow_id))["status"] == "active", timeout=10,
               message="replayed flow.started applied")
    assert bus.dead_letters() == []
