"""The whole flow lifecycle over HTTP and a real RabbitMQ: events, wire format, health."""

from __future__ import annotations

import time

import pika
import pika.exceptions
import pytest
from bson import ObjectId

from support import PRODUCT_EVENTS, eventually

from .conftest import assert_envelope

pytestmark = pytest.mark.integration

INTERNAL_FIELDS = ("_id", "outbox", "relayLeaseUntil", "relayLeaseOwner", "statusRetries",
                   "deletedAt")


def test_full_lifecycle_over_http_and_the_bus(driver, listener, flow_body, store):
    bus = listener()
    client, headers = driver.client, driver.headers
    body = flow_body("Lifecycle flow", nodes=3)

    created = client.post("/flows", json=body, headers=headers)
    assert created.status_code == 201
    flow = created.get_json()["data"]
    flow_id = flow["id"]
    assert flow["status"] == "inactive"
    [event] = bus.wait("flowrepo.flow.created", flow_id)
    assert event.payload == {"tenant": "tenant-1", "user": "user-1", "flowId": flow_id}

    started = client.post(f"/flows/{flow_id}/start", headers=headers)
    assert started.status_code == 200
    assert started.get_json() == {"data": {"id": flow_id, "status": "starting"}, "meta": {}}
    [starting] = bus.wait("flow.starting", flow_id)
    payload = starting.payload
    assert payload["id"] == flow_id
    assert payload["status"] == "starting"
    assert payload["startedBy"] == "user-1"
    assert payload["name"] == "Lifecycle flow"
    assert payload["graph"] == body["graph"]
    assert {"id": "user-1", "type": "user"} in payload["owners"]
    for field in INTERNAL_FIELDS:
        assert field not in payload, field
    assert driver.get(flow_id)["status"] == "starting"

    driver.report("flow.started", flow_id)
    eventually(lambda: driver.get(flow_id)["status"] == "active", message="GET shows active")

    stopped = client.post(f"/flows/{flow_id}/stop", headers=headers)
    assert stopped.status_code == 200
    assert stopped.get_json() == {"data": {"id": flow_id, "status": "stopping"}, "meta": {}}
    [stopping] = bus.wait("flow.stopping", flow_id)
    assert stopping.payload["id"] == flow_id
    assert stopping.payload["status"] == "stopping"
    for field in INTERNAL_FIELDS:
        assert field not in stopping.payload, field

    driver.report("flow.stopped", flow_id)
    eventually(lambda: driver.get(flow_id)["status"] == "inactive", message="GET shows inactive")

    patched = client.patch(f"/flows/{flow_id}", json={"name": "Renamed"}, headers=headers)
    assert patched.status_code == 200
    assert patched.get_json()["data"]["name"] == "Renamed"
    [modified] = bus.wait("flowrepo.flow.modified", flow_id)
    assert modified.payload == {"tenant": "tenant-1", "user": "user-1", "flowId": flow_id}

    deleted = client.delete(f"/flows/{flow_id}", headers=headers)
    assert deleted.status_code == 200
    assert client.get(f"/flows/{flow_id}", headers=headers).status_code == 404
    [gone] = bus.wait("flowrepo.flow.deleted", flow_id)
    assert gone.payload == {"tenant": "tenant-1", "user": "user-1", "flowId": flow_id}
    eventually(lambda: store.raw(ObjectId(flow_id)) is None,
               message="deleted flow removed once its events are out")

    names = [m.routing_key for m in bus.events(flow_id=flow_id)]
    assert names == ["flowrepo.flow.created", "flow.starting", "flow.stopping",
                     "flowrepo.flow.modified", "flowrepo.flow.deleted"]
    for message in bus.events(flow_id=flow_id):
        assert_envelope(message)
    ids = [m.event_id for m in bus.events()]
    assert len(ids) == len(set(ids))


def test_every_envelope_has_the_oih_headers_and_amqp_properties(driver, listener, settings):
    bus = listener()
    before = int(time.time() * 1000)
    flow_id = driver.bring_to("active")
    driver.command(flow_id, "stop")
    bus.wait("flow.stopping", flow_id)
    after = int(time.time() * 1000)

    messages = bus.events(flow_id=flow_id)
    assert [m.routing_key for m in messages] == [
        "flowrepo.flow.created", "flow.starting", "flow.stopping"]
    for message in messages:
        body = assert_envelope(message)
        assert before - 1000 <= body["headers"]["createdAt"] <= after + 1000
        assert message.exchange == settings.event_exchange
    event_ids = [m.event_id for m in messages]
    assert len(set(event_ids)) == len(event_ids)


def test_exchange_is_a_durable_topic_declared_by_the_service(deployment, listener, settings):
    # declare=False: the listener waits for the service's declaration instead of making one
    bus = listener(*PRODUCT_EVENTS, declare=False)
    connection = pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    try:
        same = connection.channel()
        same.exchange_declare(settings.event_exchange, "topic", durable=True)  # no conflict
        for exchange_type, durable in (("topic", False), ("direct", True), ("fanout", True)):
            probe = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                probe.exchange_declare(settings.event_exchange, exchange_type, durable=durable)
            assert refused.value.reply_code == 406  # PRECONDITION_FAILED: other type/durability
    finally:
        connection.close()
    assert bus.events() == []


def test_healthcheck_reports_the_queue_connected(deployment):
    client = deployment.client

    def healthy():
        response = client.get("/healthcheck")
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "pass", body
        return body

    body = eventually(healthy)
    assert body["details"]["mongoDB"]["status"] == "pass"
    assert body["details"]["queue"] == {"status": "pass", "connected": True}


def test_consumer_queue_is_durable_and_bound_to_every_consumed_event(driver, bus, settings):
    connection = pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    try:
        probe = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            probe.queue_declare(settings.event_queue, durable=False)
        assert refused.value.reply_code == 406  # the service declared it durable
    finally:
        connection.close()
    # bus.publish is mandatory with confirms: an unbound routing key raises UnroutableError
    with pytest.raises(pika.exceptions.UnroutableError):
        bus.publish("flow.unheard-of", ObjectId())
    for name in ("flow.started", "flow.stopped", "flow.failed", "iam.user.deleted",
                 "iam.tenant.deleted"):
        bus.publish(name, ObjectId())  # unknown ids: consumed and ignored
    driver.barrier()
    assert bus.queue_state() == (0, 1)
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)
