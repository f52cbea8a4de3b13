"""EVENT_QUEUE_TYPE=quorum on the real RabbitMQ: the broker counts deliveries across workers."""

from __future__ import annotations

import threading

import pika
import pika.exceptions
import pytest
from bson import ObjectId

from flow_repository.entrypoints.consumer import StatusConsumer
from support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def quorum(settings):
    return settings.replace(event_queue_type="quorum", consumer_max_attempts=3)


def crash_while_handling(settings, bus) -> int:
    """Take the next message from the service's queue and die without acking, as a worker
    killed mid-message would; returns the delivery count the broker reported with it."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        # A consumer, as a worker is: a single-active-consumer quorum queue refuses basic.get.
        for method, properties, _ in channel.consume(settings.event_queue,
                                                     inactivity_timeout=15):
            assert method is not None, "a message to take"
            return (properties.headers or {}).get("x-delivery-count", 0)
    finally:
        connection.close()  # unacked: the broker returns the message and counts it


def test_the_service_declares_a_quorum_queue_and_applies_events_from_it(
        make_app, drive, quorum, bus, broker):
    driver = drive(make_app(quorum))
    flow_id = driver.bring_to("starting")
    driver.report("flow.started", flow_id)
    assert driver.wait_status(flow_id, "active")["statusReason"] == "orchestrator reported started"
    # Redeclaring with exactly these arguments succeeds only if the queue has them all.
    broker.queue_declare(quorum.event_queue, durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 2, "x-single-active-consumer": True,  # 3 deliveries = 2 returns
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": bus.dead_letter_queue})
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-type"):
        broker.connection.channel().queue_declare(quorum.event_queue, durable=True, arguments={
            "x-queue-type": "classic", "x-single-active-consumer": True,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": bus.dead_letter_queue})


def test_a_message_that_kills_every_worker_is_dead_lettered_by_the_broker(
        make_app, quorum, bus):
    make_app(quorum).runtime.consumer.stop()  # declared; now no worker runs
    eventually(lambda: bus.queue_state() == (0, 0), message="consumer gone")
    raw = bus.publish("flow.started", ObjectId())

    counts = [crash_while_handling(quorum, bus) for _ in range(quorum.consumer_max_attempts)]

    assert counts == [0, 1, 2]  # the count survived each "restart"
    [dead] = eventually(bus.dead_letters, message="dead-lettered by the broker")
    assert dead.raw == raw
    assert dead.properties.headers["x-first-death-reason"] == "delivery_limit"
    assert bus.queue_state() == (0, 0)


def test_attempts_counted_before_a_restart_are_not_granted_again(
        make_app, drive, quorum, bus, monkeypatch):
    deployment = make_app(quorum)
    runtime = deployment.runtime
    runtime.consumer.stop()
    eventually(lambda: bus.queue_state() == (0, 0), message="consumer gone")
    driver = drive(deployment)
    flow_id = driver.bring_to("starting")
    bus.publish("flow.started", flow_id)
    assert crash_while_handling(quorum, bus) == 0  # first worker died with it in hand
    assert crash_while_handling(quorum, bus) == 1  # so did the second

    calls = []
    lock = threading.Lock()

    def broken(name, payload):
        with lock:
            calls.append(name)
        raise RuntimeError("a bug in the handler")

    monkeypatch.setattr(runtime.service, "apply_status_event", broken)
    survivor = StatusConsumer(quorum, runtime.service, runtime.metrics)  # no memory of the above
    survivor.start()
    try:
        [dead] = eventually(bus.dead_letters, timeout=20, message="dead-lettered")
        assert calls == ["flow.started"]  # 2 deliveries spent already: one attempt left
        assert dead.properties.headers["x-death-reason"] == (
            "failed 3 times: RuntimeError: a bug in the handler")
        assert survivor.alive
    finally:
        survivor.stop()
    assert driver.store.raw(ObjectId(flow_id))["status"] == "starting"
