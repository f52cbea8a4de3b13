"""Integration helpers: bus listener, orchestrator publisher, background apps, polling."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest
from bson import ObjectId

from flow_repository.app import create_app
from flow_repository.consumer import dead_letter_queue
from flow_repository.settings import Settings
from flow_repository.store import FlowStore

PRODUCT_EVENTS = (
    "flow.starting",
    "flow.stopping",
    "flowrepo.flow.created",
    "flowrepo.flow.modified",
    "flowrepo.flow.deleted",
)
HEX_EVENT_ID = re.compile(r"^[0-9a-f]{16,64}$")


# ----------------------------------------------------------------------------- polling


def eventually(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    An AssertionError raised by the condition counts as "not yet" and is re-raised as the
    cause when the deadline passes, so conditions may be written with plain asserts.
    """
    deadline = time.monotonic() + timeout
    last_error: AssertionError | None = None
    while True:
        try:
            result = condition()
        except AssertionError as error:
            last_error, result = error, None
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(condition, "__name__", repr(condition))
            raise AssertionError(f"not true within {timeout}s: {what}") from last_error
        time.sleep(interval)


# ----------------------------------------------------------------------------- broker access


@dataclass
class Received:
    """One message taken from a queue: routing key, AMQP properties and decoded body."""

    routing_key: str
    exchange: str
    properties: pika.BasicProperties
    raw: bytes
    redelivered: bool

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def name(self) -> str:
        return self.body["headers"]["name"]

    @property
    def payload(self) -> dict:
        return self.body["payload"]

    @property
    def flow_id(self) -> str | None:
        payload = self.body.get("payload") or {}
        return payload.get("id") or payload.get("flowId")

    @property
    def event_id(self) -> str:
        return self.body["headers"]["eventId"]


def connect(settings: Settings) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    except pika.exceptions.AMQPError as error:
        pytest.fail(f"RabbitMQ is not reachable at {settings.queue_url}: {error!r}")


class Listener:
    """A private queue bound to the test's exchange; collects what the service publishes."""

    def __init__(self, settings: Settings, keys: tuple[str, ...], declare: bool = True) -> None:
        self._settings = settings
        self._connection = connect(settings)
        self._channel = self._connection.channel()
        exchange = settings.event_exchange
        if declare:
            self._channel.exchange_declare(exchange, "topic", durable=True)
        else:  # wait for the service to declare it, so its declaration is the one observed
            eventually(lambda: exchange_exists(self._connection, exchange), timeout=10,
                       message=f"exchange {exchange} declared by the service")
        self.queue = self._channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in keys:
            self._channel.queue_bind(self.queue, exchange, routing_key=key)
        self.messages: list[Received] = []

    def drain(self) -> list[Received]:
        """Fetch everything waiting; returns every message collected so far."""
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.messages
            self.messages.append(Received(method.routing_key, method.exchange, properties,
                                          body, method.redelivered))

    def events(self, name: str | None = None, flow_id: Any = None) -> list[Received]:
        """Collected messages, optionally of one event name and/or about one flow."""
        self.drain()
        wanted = None if flow_id is None else str(flow_id)
        return [m for m in self.messages
                if (name is None or m.routing_key == name)
                and (wanted is None or m.flow_id == wanted)]

    def wait(self, name: str, flow_id: Any = None, count: int = 1,
             timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages of ``name`` (about ``flow_id``) arrived."""
        return eventually(
            lambda: (found := self.events(name, flow_id)) and len(found) >= count and found,
            timeout=timeout, message=f"{count} x {name} for flow {flow_id}",
        )

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


def exchange_exists(connection: pika.BlockingConnection, exchange: str) -> bool:
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    channel.close()
    return True


@pytest.fixture
def listener(settings: Settings, broker) -> Iterator[Callable[..., Listener]]:
    """listener(*routing_keys, declare=True): a Listener on the test's exchange."""
    opened: list[Listener] = []

    def make(*keys: str, declare: bool = True) -> Listener:
        created = Listener(settings, keys or PRODUCT_EVENTS, declare)
        opened.append(created)
        return created

    yield make
    for item in opened:
        item.close()


class BrokerTools:
    """Orchestrator-side publishing and queue inspection on the test's exchange and queues."""

    def __init__(self, settings: Settings, connection: pika.BlockingConnection) -> None:
        self.settings = settings
        self._connection = connection
        self._channel = connection.channel()
        self._channel.confirm_delivery()
        self._declared = False

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue(self.settings.event_queue)

    def envelope(self, name: str, flow_id: Any) -> dict:
        return {
            "headers": {"name": name, "createdAt": int(time.time() * 1000),
                        "serviceName": "component-orchestrator"},
            "payload": {"id": str(flow_id)},
        }

    def publish(self, name: str, flow_id: Any = None, *, body: Any = None,
                raw: bytes | None = None, headers: Mapping[str, Any] | None = None) -> bytes:
        """Publish an OIH envelope (or ``body``/``raw`` as given) to the exchange as ``name``."""
        if not self._declared:
            self._channel.exchange_declare(self.settings.event_exchange, "topic", durable=True)
            self._declared = True
        if raw is None:
            raw = json.dumps(self.envelope(name, flow_id) if body is None else body).encode()
        self._channel.basic_publish(
            self.settings.event_exchange, name, raw,
            pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 message_id=uuid.uuid4().hex, headers=dict(headers or {})),
            mandatory=True,
        )
        return raw

    def replay(self, raw: bytes, headers: Mapping[str, Any]) -> None:
        """Publish straight into the service's queue, as an operator replays a dead letter."""
        self._channel.basic_publish(
            "", self.settings.event_queue, raw,
            pika.BasicProperties(delivery_mode=2, headers=dict(headers)),
        )

    def bind(self, routing_key: str) -> None:
        self._channel.queue_bind(self.settings.event_queue, self.settings.event_exchange,
                                 routing_key=routing_key)

    def queue_state(self, queue: str | None = None) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None when it does not exist."""
        channel = self._connection.channel()
        try:
            frame = channel.queue_declare(queue or self.settings.event_queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        channel.close()
        return frame.method.message_count, frame.method.consumer_count

    def wait_consumers(self, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until the service's queue exists, is bound and has ``count`` consumers."""
        eventually(lambda: (state := self.queue_state()) is not None and state[1] == count,
                   timeout=timeout, message=f"{count} consumer(s) on {self.settings.event_queue}")

    def take(self, queue: str) -> list[Received]:
        """Remove and return every message waiting in ``queue``."""
        taken = []
        while True:
            method, properties, body = self._channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append(Received(method.routing_key, method.exchange, properties, body,
                                  method.redelivered))

    def dead_letters(self) -> list[Received]:
        return self.take(self.dead_letter_queue)


@pytest.fixture
def bus(settings: Settings, broker) -> Iterator[BrokerTools]:
    """Publish as the orchestrator or IAM, and inspect the service's queues."""
    connection = connect(settings)
    yield BrokerTools(settings, connection)
    if connection.is_open:
        connection.close()


# ----------------------------------------------------------------------------- settings & apps


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, with a relay that polls often enough for quick tests."""
    return settings.replace(relay_poll_seconds=0.2)


@pytest.fixture
def make_app(settings: Settings, store: FlowStore, broker, bus: BrokerTools):
    """make_app(settings=None, background=True): an app on the test store, stopped afterwards.

    A background app is returned only once its consumer is consuming (queue declared and
    bound) and its relay is connected, so that tests never race the start-up.
    """
    started = []

    def make(custom: Settings | None = None, *, background: bool = True):
        application = create_app(custom or settings, store=store, background=background)
        started.append(application)
        if background:
            runtime = application.extensions["flow_repository"]
            bus.wait_consumers(1)
            eventually(lambda: runtime.relay.connected, timeout=15, message="relay connected")
        return application

    yield make
    for application in reversed(started):
        application.extensions["flow_repository"].stop()


@pytest.fixture
def app(make_app):
    """The app with its relay, consumer and reconciler running (embedded mode)."""
    return make_app()


class Driver:
    """Drives flows through HTTP and orchestrator reports, checking each answer."""

    def __init__(self, application, bus: BrokerTools, headers: dict[str, str],
                 store: FlowStore, flow_body: Callable[..., dict]) -> None:
        self.app = application
        self.flow_body = flow_body
        self.client = application.test_client()
        self.bus = bus
        self.headers = headers
        self.store = store

    @property
    def runtime(self):
        return self.app.extensions["flow_repository"]

    def create(self, body: Mapping[str, Any] | None = None, headers=None) -> str:
        response = self.client.post("/flows", json=dict(body or self.flow_body()),
                                    headers=headers or self.headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()["data"]["id"]

    def get(self, flow_id: str) -> dict:
        response = self.client.get(f"/flows/{flow_id}", headers=self.headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["data"]

    def command(self, flow_id: str, action: str, expect: int = 200) -> dict:
        response = self.client.post(f"/flows/{flow_id}/{action}", headers=self.headers)
        assert response.status_code == expect, response.get_json()
        return response.get_json()

    def wait_status(self, flow_id: str, status: str, timeout: float = 10.0) -> dict:
        return eventually(lambda: (doc := self.store.raw(ObjectId(flow_id)))
                          and doc["status"] == status and doc,
                          timeout=timeout, message=f"flow {flow_id} {status}")

    def report(self, name: str, flow_id: Any) -> None:
        self.bus.publish(name, flow_id)

    def bring_to(self, status: str, body: Mapping[str, Any] | None = None) -> str:
        """A new flow in ``status``, reached through the real API and orchestrator reports."""
        flow_id = self.create(body)
        if status == "inactive":
            return flow_id
        assert self.command(flow_id, "start")["data"]["status"] == "starting"
        if status == "starting":
            return flow_id
        self.report("flow.started", flow_id)
        self.wait_status(flow_id, "active")
        if status == "active":
            return flow_id
        assert self.command(flow_id, "stop")["data"]["status"] == "stopping"
        assert status == "stopping", status
        return flow_id

    def barrier(self) -> None:
        """Return once every message published before it has been handled by the consumer.

        The service's queue has one consumer, which handles its messages strictly in
        delivery order: when a flow.started published now has been applied, so has all before it.
        """
        flow_id = self.bring_to("starting")
        self.report("flow.started", flow_id)
        self.wait_status(flow_id, "active")


@pytest.fixture
def drive(bus: BrokerTools, auth, store: FlowStore, flow_body) -> Callable[..., Driver]:
    """drive(app, headers=None): a Driver for that app (default caller user-1 / tenant-1)."""

    def make(application, headers: dict[str, str] | None = None) -> Driver:
        return Driver(application, bus, headers or auth(), store, flow_body)

    return make


@pytest.fixture
def driver(app, drive) -> Driver:
    return drive(app)


def assert_envelope(message: Received, *, now_ms: int | None = None) -> dict:
    """Check the OIH wire format and AMQP properties of one message the service published."""
    body = message.body
    headers = body["headers"]
    assert set(body) == {"headers", "payload"}
    assert headers["name"] == message.routing_key
    assert headers["serviceName"] == "flow-repository"
    assert isinstance(headers["createdAt"], int) and not isinstance(headers["createdAt"], bool)
    now_ms = now_ms or int(time.time() * 1000)
    assert abs(now_ms - headers["createdAt"]) < 120_000, headers["createdAt"]
    assert HEX_EVENT_ID.match(headers["eventId"]), headers["eventId"]
    assert message.properties.delivery_mode == 2
    assert message.properties.content_type == "application/json"
    assert message.properties.message_id == headers["eventId"]
    assert isinstance(body["payload"], dict)
    return body
