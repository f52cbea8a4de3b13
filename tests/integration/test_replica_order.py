"""Several status consumers on one queue, as the manifests ship them: per-flow order holds,
on classic and quorum queues, across a failover, and an old queue declaration is named."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
from bson import ObjectId

from flow_repository.entrypoints.consumer import QueueMismatch, StatusConsumer
from flow_repository.server.metrics import Metrics
from support import eventually, statuses

pytestmark = pytest.mark.integration

FLOWS = 100
REPLICAS = 3


@pytest.fixture(params=["classic", "quorum"])
def queue_settings(request, settings):
    return settings.replace(event_queue_type=request.param)


class SlowService:
    """A service that takes a little while for each report, so a failover comes mid-stream."""

    def __init__(self, service: Any, pause: float) -> None:
        self._service = service
        self._pause = pause
        self.applied = 0

    def apply_status_event(self, name: str, payload: Any) -> str:
        time.sleep(self._pause)
        outcome = self._service.apply_status_event(name, payload)
        self.applied += 1
        return outcome

    def remove_owner(self, owner_id: Any) -> int:
        return self._service.remove_owner(owner_id)


@pytest.fixture
def replicas(queue_settings) -> Callable[..., StatusConsumer]:
    """replicas(service): a further StatusConsumer on the service's queue, stopped afterwards."""
    started: list[StatusConsumer] = []

    def start(service: Any) -> StatusConsumer:
        consumer = StatusConsumer(queue_settings, service, Metrics())
        consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        consumer.stop()


def wait_registered(consumers: list[StatusConsumer]) -> None:
    """Wait until every consumer is registered (a quorum queue counts only the active one)."""
    eventually(lambda: all(consumer.consuming for consumer in consumers), 15,
               message="every replica registered with the broker")


def started_flows(make_app, drive, queue_settings, count: int = FLOWS):
    """A deployment with its own consumer, its driver, and ``count`` flows in ``starting``."""
    deployment = make_app(queue_settings)
    driver = drive(deployment)
    created = driver.client.post("/flows", headers=driver.headers,
                                 json=[driver.flow_body(f"Flow {n}") for n in range(count)])
    assert created.status_code == 201, created.get_json()
    flows = [item["id"] for item in created.get_json()["data"]]
    started = driver.client.post("/flows/multiple/start", headers=driver.headers, json=flows)
    assert [item["data"]["status"] for item in started.get_json()] == ["starting"] * count
    return deployment, driver, flows


@pytest.mark.parametrize("last, expected", [("flow.stopped", "inactive"),
                                            ("flow.failed", "stopping")])
def test_back_to_back_reports_apply_in_order_with_three_consumers(
        make_app, drive, queue_settings, replicas, bus, store, last, expected) -> None:
    deployment, _, flows = started_flows(make_app, drive, queue_settings)
    consumers = [deployment.runtime.consumer]
    consumers += [replicas(deployment.runtime.service) for _ in range(REPLICAS - 1)]
    wait_registered(consumers)

    for flow_id in flows:  # each flow's two reports in flight together
        bus.publish("flow.started", flow_id)
        bus.publish(last, flow_id)

    def all_there() -> bool:
        counts = statuses(store, flows)
        assert counts == {expected: FLOWS}, counts
        return True

    eventually(all_there, 60, interval=0.2, message=f"every flow {expected}")
    assert bus.queue_state()[0] == 0
    assert bus.queue_state(bus.dead_letter_queue)[0] == 0


def test_a_failover_mid_stream_keeps_each_flows_order(
        make_app, drive, queue_settings, replicas, bus, store) -> None:
    deployment, _, flows = started_flows(make_app, drive, queue_settings)
    # The app's own consumer registered first and is the active one; stop it mid-stream.
    active = deployment.runtime.consumer
    standby = [replicas(deployment.runtime.service) for _ in range(REPLICAS - 1)]
    wait_registered([active, *standby])
    slow = SlowService(deployment.runtime.service, 0.01)
    active._service = slow  # the reports take a while, so the stop comes mid-stream

    for flow_id in flows:
        bus.publish("flow.started", flow_id)
        bus.publish("flow.stopped", flow_id)
    eventually(lambda: slow.applied >= 20, 30, interval=0.01, message="the active consumer busy")
    active.stop()
    assert slow.applied < 2 * FLOWS, "the failover must come mid-stream"

    def all_inactive() -> bool:
        counts = statuses(store, flows)
        odd = [flow_id for flow_id in flows if store.raw(ObjectId(flow_id))["status"] != "inactive"]
        assert counts == {"inactive": FLOWS}, (counts, bus.queue_state(), [
            (store.raw(ObjectId(f)), store.history.page(ObjectId(f), 1, 10)) for f in odd[:1]])
        return True

    eventually(all_inactive, 60, interval=0.2, message="every flow inactive")
    assert all(consumer.alive for consumer in standby)
    for flow_id in flows:  # started, then stopped: two changes after the start, no more
        assert store.raw(ObjectId(flow_id))["statusReason"] == "orchestrator reported stopped"


def test_a_queue_declared_without_single_active_consumer_is_refused_with_the_procedure(
        queue_settings, broker) -> None:
    if queue_settings.event_queue_type == "quorum":
        arguments = {"x-queue-type": "quorum"}
    else:
        arguments = None  # as OIH's service and earlier versions of this one declared it
    broker.queue_declare(queue_settings.event_queue, durable=True, arguments=arguments)
    consumer = StatusConsumer(queue_settings, None, Metrics())
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the consumer gives up instead of retrying for ever"
    assert isinstance(consumer.failure, QueueMismatch)
    message = str(consumer.failure)
    assert queue_settings.event_queue in message
    assert "x-single-active-consumer" in message
    assert "Moving an existing queue" in message
    # nothing was changed: the old queue is still there as it was
    probe = pika.BlockingConnection(pika.URLParameters(queue_settings.queue_url))
    try:
        probe.channel().queue_declare(queue_settings.event_queue, durable=True,
                                      arguments=arguments)
    finally:
        probe.close()
