"""Outbox delivery: broker outages, a relay that was not running, crashes and competing relays."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import timedelta

import pytest
from bson import ObjectId

from flow_repository.adapters.rabbitmq import BrokerUnavailable, Publisher
from flow_repository.adapters.relay import OutboxRelay
from flow_repository.adapters.store import utcnow
from flow_repository.server.bootstrap import Runtime
from support import Received, eventually

pytestmark = pytest.mark.integration


def outbox_names(store, flow_id: str) -> list[str]:
    return [event["name"] for event in store.raw(ObjectId(flow_id)).get("outbox", [])]


def assert_in_order(messages: list[Received], expected_names: list[str]) -> None:
    """Each new event comes after every earlier one. A relay that crashed after the broker
    confirmed a batch publishes it again (at least once): such a replay may go back, but
    then runs forward in order, and no new event comes before it has caught up."""
    distinct: list[str] = []
    previous = -1
    for message in messages:
        if message.event_id in distinct:
            index = distinct.index(message.event_id)
            assert index <= previous or index == previous + 1, (
                f"{message.routing_key} {message.event_id} skipped ahead in a replay: "
                f"{[m.routing_key for m in messages]}")
        else:
            assert previous == len(distinct) - 1, (
                f"{message.routing_key} {message.event_id} overtook a replay: "
                f"{[m.routing_key for m in messages]}")
            distinct.append(message.event_id)
            index = len(distinct) - 1
        previous = index
    by_id = {m.event_id: m.routing_key for m in messages}
    assert [by_id[event_id] for event_id in distinct] == expected_names


def relay_for(store, settings, **options) -> OutboxRelay:
    return OutboxRelay(store, Publisher(settings.queue_url, settings.event_exchange),
                       poll_seconds=options.pop("poll_seconds", 0.05), **options)


def test_events_wait_out_a_broker_outage_and_arrive_in_order(deploy, settings, broker_proxy, drive,
                                                            listener, store):
    events = listener()
    driver = drive(deploy(queue_url=broker_proxy.url(settings.queue_url)))
    orchestrator = Runtime.build(settings, store=store).service  # no loops: writes only
    client = driver.client
    plain = [driver.create() for _ in range(3)]
    running = driver.bring_to("active")
    cycled = driver.create()
    events.wait("flowrepo.flow.created", count=5)
    events.wait("flow.starting", running)
    # confirmed and dropped too, so the cut cannot take a confirm away (at least once)
    eventually(lambda: all(outbox_names(store, f) == [] for f in (*plain, running, cycled)))
    assert broker_proxy.live_connections >= 2  # the relay and the consumer go through the proxy

    broker_proxy.cut()

    def degraded():
        response = client.get("/healthcheck")
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "warn", body
        assert body["details"]["queue"]["connected"] is False
        assert body["details"]["mongoDB"]["status"] == "pass"
        return body

    eventually(degraded, message="healthcheck reports the queue down")
    for flow_id in plain:
        assert driver.command(flow_id, "start") == {"data": {"id": flow_id, "status": "starting"},
                                                     "meta": {}}
    assert driver.command(running, "stop")["data"]["status"] == "stopping"
    assert driver.command(cycled, "start")["data"]["status"] == "starting"
    # the orchestrator's report cannot arrive through the cut either: apply it as the
    # consumer would, so that the flow collects two pending events
    orchestrator.apply_status_event("flow.started", {"id": cycled})
    assert driver.command(cycled, "stop")["data"]["status"] == "stopping"
    listed = client.get("/flows?page[size]=50", headers=driver.headers)
    assert listed.status_code == 200 and listed.get_json()["meta"]["total"] == 5
    assert outbox_names(store, cycled) == ["flow.starting", "flow.stopping"]
    assert outbox_names(store, running) == ["flow.stopping"]
    assert all(outbox_names(store, flow_id) == ["flow.starting"] for flow_id in plain)
    degraded()
    eventually(lambda: broker_proxy.refused >= 1, message="the service tries to reconnect while cut")
    assert events.events("flow.stopping") == []
    assert all(events.events("flow.starting", flow_id) == [] for flow_id in plain)

    broker_proxy.restore()

    for flow_id in plain:
        events.wait("flow.starting", flow_id, timeout=30)
    events.wait("flow.stopping", running, timeout=30)
    events.wait("flow.stopping", cycled, timeout=30)
    for flow_id in plain:
        assert_in_order(events.events(flow_id=flow_id), ["flowrepo.flow.created", "flow.starting"])
    assert_in_order(events.events(flow_id=running),
                    ["flowrepo.flow.created", "flow.starting", "flow.stopping"])
    assert_in_order(events.events(flow_id=cycled),
                    ["flowrepo.flow.created", "flow.starting", "flow.stopping"])
    for flow_id in plain:  # nothing was published twice in this outage
        assert len(events.events("flow.starting", flow_id)) == 1
    # the relay drops a batch's events once all of them are confirmed: a moment later
    eventually(lambda: all(outbox_names(store, f) == [] for f in (*plain, running, cycled)))

    def recovered():
        body = client.get("/healthcheck").get_json()
        assert body["status"] == "pass", body
        return body["details"]["queue"]["connected"] is True

    eventually(recovered, timeout=30, message="healthcheck recovers")
    # and the consumer is back too: a report now goes through
    driver.report("flow.stopped", cycled)
    driver.wait_status(cycled, "inactive", timeout=30)


def test_events_stored_without_a_relay_are_published_by_a_later_one(make_app, settings,
                                                                    drive, listener, store):
    """The process died between the database write and the publish: nothing is lost."""
    events = listener()
    driver = drive(make_app(background=False))
    first = driver.create()
    driver.command(first, "start")
    second = driver.create()
    assert outbox_names(store, first) == ["flowrepo.flow.created", "flow.starting"]
    assert outbox_names(store, second) == ["flowrepo.flow.created"]
    assert events.events() == []

    relay = relay_for(store, settings)
    relay.start()
    try:
        events.wait("flow.starting", first)
        events.wait("flowrepo.flow.created", second)
        eventually(lambda: outbox_names(store, first) == outbox_names(store, second) == [])
    finally:
        relay.stop()
    assert_in_order(events.events(flow_id=first), ["flowrepo.flow.created", "flow.starting"])
    assert_in_order(events.events(flow_id=second), ["flowrepo.flow.created"])
    assert store.raw(ObjectId(first)).get("relayLeaseOwner") is None


def test_a_lease_left_by_a_crashed_relay_expires(make_app, settings, drive, listener, store):
    events = listener()
    driver = drive(make_app(background=False))
    orphan = driver.create()
    other = driver.create()
    # the oldest pending flow (created first) is the one the crashed relay leased
    claimed = store.claim_batch("relay-that-crashed", utcnow() + timedelta(seconds=1), 1)
    assert [flow["_id"] for flow in claimed] == [ObjectId(orphan)]
    stuck, free = orphan, other

    relay = relay_for(store, settings)
    relay.start()
    try:
        events.wait("flowrepo.flow.created", free)
        assert events.events(flow_id=stuck) == []  # still leased to the dead relay
        events.wait("flowrepo.flow.created", stuck, timeout=10)
    finally:
        relay.stop()
    assert outbox_names(store, stuck) == []


def test_a_crash_after_the_confirm_republishes_instead_of_losing(make_app, settings, drive,
                                                                 listener, store, monkeypatch):
    events = listener()
    driver = drive(make_app(background=False))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    original = store.finish_batch
    failures = []

    def crash_once(relay_id, **done):
        if not failures:
            failures.extend(done["published"][ObjectId(flow_id)])
            raise RuntimeError("process died before removing the published events")
        return original(relay_id, **done)

    monkeypatch.setattr(store, "finish_batch", crash_once)
    # a short lease: the crashed relay's lease must run out before the events go again
    relay = relay_for(store, settings, lease_seconds=0.6)
    relay.start()
    try:
        events.wait("flow.starting", flow_id)
        eventually(lambda: outbox_names(store, flow_id) == [])
    finally:
        relay.stop()
    messages = events.events(flow_id=flow_id)
    for event_id in failures:  # at least once: a duplicate of each
        assert [m.event_id for m in messages].count(event_id) == 2
    assert_in_order(messages, ["flowrepo.flow.created", "flow.starting"])


def test_two_relays_never_reorder_a_flows_events(make_app, settings, drive, listener, store):
    events = listener()
    driver = drive(make_app(background=False))
    service = driver.deployment.runtime.service
    flows = [driver.create() for _ in range(12)]
    expected: dict[str, list[str]] = defaultdict(lambda: ["flowrepo.flow.created"])

    def cycle(flow_id: str) -> None:
        driver.command(flow_id, "start")
        service.apply_status_event("flow.started", {"id": flow_id})
        driver.command(flow_id, "stop")
        service.apply_status_event("flow.stopped", {"id": flow_id})
        patched = driver.client.patch(f"/flows/{flow_id}", json={"description": "again"},
                                      headers=driver.headers)
        assert patched.status_code == 200
        expected[flow_id] += ["flow.starting", "flow.stopping", "flowrepo.flow.modified"]

    for flow_id in flows:  # a backlog before the relays start ...
        cycle(flow_id)
    counts = defaultdict(int)
    lock = threading.Lock()

    def counter(relay_name):
        def count(_event_name):
            with lock:
                counts[relay_name] += 1
        return count

    # small batches, so that both relays get flows of the dozen to lease
    relays = [relay_for(store, settings, lease_seconds=0.6, batch_size=2,
                        on_published=counter(name))
              for name in ("a", "b")]
    for relay in relays:
        relay.start()
    try:
        for flow_id in flows:  # ... and more events while both relays publish
            cycle(flow_id)
            for relay in relays:
                relay.wake()
        total = sum(len(names) for names in expected.values())
        eventually(lambda: len({m.event_id for m in events.events()}) >= total, timeout=30,
                   message=f"{total} distinct events")
    finally:
        for relay in relays:
            relay.stop()
    for flow_id in flows:
        assert_in_order(events.events(flow_id=flow_id), expected[flow_id])
        assert outbox_names(store, flow_id) == []
    assert counts["a"] > 0 and counts["b"] > 0, counts


def test_an_event_the_broker_does_not_confirm_stays_in_the_outbox_and_is_retried(
        make_app, settings, drive, listener, store, broker):
    events = listener("flowrepo.flow.created")
    driver = drive(make_app(background=False))
    flow_id = driver.create()
    [pending] = store.raw(ObjectId(flow_id))["outbox"]
    # A queue that takes nothing and refuses rather than drops: the broker answers the
    # relay's publish with a nack instead of a confirm.
    refusing = f"{settings.event_queue}.refusing"
    broker.queue_declare(refusing, durable=False, arguments={
        "x-max-length": 0, "x-overflow": "reject-publish"})
    broker.queue_bind(refusing, settings.event_exchange, routing_key="#")
    relay = relay_for(store, settings)
    try:
        for _attempt in range(2):  # refused again on retry: still not dropped
            with pytest.raises(BrokerUnavailable):
                relay.publish_pending()
            assert store.raw(ObjectId(flow_id))["outbox"] == [pending]
            assert store.raw(ObjectId(flow_id)).get("relayLeaseOwner") is None
    finally:
        broker.queue_delete(refusing)
    assert relay.publish_pending() == 1  # the broker confirms now
    assert outbox_names(store, flow_id) == []
    delivered = events.wait("flowrepo.flow.created", flow_id)
    assert {message.event_id for message in delivered} == {pending["eventId"]}


def test_a_relay_past_its_publish_deadline_stops_and_cannot_reorder_a_flows_events(
        make_app, settings, drive, listener, store, broker_proxy):
    events = listener()
    driver = drive(make_app(background=False))
    flow_id = driver.create()
    driver.command(flow_id, "start")
    assert outbox_names(store, flow_id) == ["flowrepo.flow.created", "flow.starting"]
    lease = 1.5  # the margin is a third: confirms are awaited for about a second
    behind_proxy = settings.replace(queue_url=broker_proxy.url(settings.queue_url))
    stalled = relay_for(store, behind_proxy, lease_seconds=lease)
    stalled._publisher.connect()
    broker_proxy.stall()  # what it publishes now is held on the way, no confirm comes back

    started = time.monotonic()
    assert stalled.publish_pending() == 0
    waited = time.monotonic() - started
    assert lease / 2 <= waited < lease * 2 / 3 + 0.3, waited  # no longer than the margin allows
    assert not stalled.connected  # it dropped the connection its messages were held on
    assert outbox_names(store, flow_id) == ["flowrepo.flow.created", "flow.starting"]
    assert store.raw(ObjectId(flow_id)).get("relayLeaseOwner") is None  # given back

    other = relay_for(store, settings)
    assert other.publish_pending() == 2
    broker_proxy.unstall()
    stalled._publisher.keep_alive()
    time.sleep(0.5)  # anything the stalled relay had sent would arrive now
    messages = events.events(flow_id=flow_id)
    assert [m.routing_key for m in messages] == ["flowrepo.flow.created", "flow.starting"]
    assert outbox_names(store, flow_id) == []


BATCH = [{"headers": {"name": "flowrepo.flow.created", "eventId": f"event-{number}",
                      "createdAt": 1733333333000}, "payload": {"number": number}}
         for number in range(3)]


def fails_at_once_with_nothing_confirmed(publisher: Publisher) -> None:
    """A batch whose sending fails raises BrokerUnavailable long before its deadline, with
    nothing confirmed, and leaves the publisher disconnected."""
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as refused:
        publisher.publish_batch(BATCH, time.monotonic() + 20)
    assert refused.value.confirmed == 0
    assert time.monotonic() - started < 5
    assert not publisher.connected


def goes_out_whole_in_order(publisher: Publisher, broker, sink: str) -> None:
    assert publisher.publish_batch(BATCH, time.monotonic() + 20) == len(BATCH)
    arrived = []
    for _ in BATCH:
        method, properties, _body = broker.basic_get(sink, auto_ack=True)
        assert method is not None
        arrived.append(properties.message_id)
    assert arrived == [message["headers"]["eventId"] for message in BATCH]


def test_a_batch_over_a_dropped_connection_fails_at_once_and_goes_out_whole_after(
        settings, broker, broker_proxy):
    """The publisher queues a batch's messages and sends them while it waits for the
    confirms: a connection the broker side dropped is found then, not at the deadline,
    nothing counts as confirmed, and the next batch reconnects and arrives in order."""
    sink = f"{settings.event_queue}.batch"
    broker.exchange_declare(settings.event_exchange, "topic", durable=True)
    broker.queue_declare(sink, durable=False, auto_delete=True)
    broker.queue_bind(sink, settings.event_exchange, routing_key="#")
    publisher = Publisher(broker_proxy.url(settings.queue_url), settings.event_exchange)
    try:
        publisher.connect()
        broker_proxy.cut()
        fails_at_once_with_nothing_confirmed(publisher)
        broker_proxy.restore()
        goes_out_whole_in_order(publisher, broker, sink)
    finally:
        publisher.close()
        broker.queue_delete(sink)


def test_a_batch_whose_channel_the_broker_closes_fails_at_once_and_goes_out_after(
        settings, broker):
    """The exchange deleted under a connected publisher: the broker closes the channel at
    the first message (404). That is found while waiting for the confirms, not at the
    batch's deadline, and the next batch declares the exchange again and arrives whole."""
    exchange = f"{settings.event_exchange}.closing"
    sink = f"{settings.event_queue}.closing"
    publisher = Publisher(settings.queue_url, exchange)
    try:
        publisher.connect()  # declares the exchange
        broker.exchange_delete(exchange)
        fails_at_once_with_nothing_confirmed(publisher)
        broker.queue_declare(sink, durable=False, auto_delete=False)
        publisher.connect()
        broker.queue_bind(sink, exchange, routing_key="#")
        goes_out_whole_in_order(publisher, broker, sink)
    finally:
        publisher.close()
        broker.queue_delete(sink)
        broker.exchange_delete(exchange)
