"""OIH event envelope, the pika publisher with confirms, and the outbox relay that uses it."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pika
import pika.exceptions

from .domain import public_flow
from .store import Store, StoreUnavailable, utcnow

log = logging.getLogger(__name__)

SERVICE_NAME = "flow-repository"
FLOW_PAYLOAD = "flow"  # the payload is the flow itself, rendered when the event is published
CLAIM_BATCH = 100  # flows the relay leases at once


def pending_event(
    name: str, payload: Mapping[str, Any] | None = None, *, revision: int | None = None,
    **flow_overrides: Any,
) -> dict[str, Any]:
    """An outbox entry. Without ``payload`` the event carries the flow, with ``flow_overrides``.

    ``revision``, when the change's revision is known before it is written, goes out as the
    ``revision`` header, so a subscriber can order a flow's changes.
    """
    now = utcnow()
    event: dict[str, Any] = {
        "eventId": uuid.uuid4().hex,
        "name": name,
        "storedAt": now,
        "createdAt": int(now.timestamp() * 1000),
    }
    if revision is not None:
        event["revision"] = revision
    if payload is None:
        event["payloadKind"] = FLOW_PAYLOAD
        event["flowOverrides"] = dict(flow_overrides)
    else:
        event["payload"] = dict(payload)
    return event


def envelope(event: Mapping[str, Any], flow: Mapping[str, Any]) -> dict[str, Any]:
    """The OIH wire format of an outbox entry: ``{headers: {...}, payload: {...}}``."""
    if event.get("payloadKind") == FLOW_PAYLOAD:
        payload = {**public_flow(flow), **event.get("flowOverrides", {})}
    else:
        payload = dict(event.get("payload") or {})
    headers = {
        "name": event["name"],
        "createdAt": event["createdAt"],
        "serviceName": SERVICE_NAME,
        "eventId": event["eventId"],
    }
    if "revision" in event:
        headers["revision"] = event["revision"]
    return {"headers": headers, "payload": payload}


class BrokerUnavailable(Exception):
    """RabbitMQ refused, dropped the connection or did not confirm a message."""


def broker_parameters(queue_url: str) -> pika.URLParameters:
    """Connection settings that fail fast, so callers can back off and retry themselves."""
    parameters = pika.URLParameters(queue_url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 5
    parameters.blocked_connection_timeout = 10
    return parameters


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close a connection that may already be broken."""
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except (pika.exceptions.AMQPError, OSError):
            pass


def back_off(delay: float, first: float) -> float:
    """The next pause after a failure: ``first``, then doubling, at most 10 seconds."""
    return min(max(delay * 2, first), 10.0)


class Publisher:
    """One pika connection with publisher confirms; use it from a single thread only."""

    def __init__(self, queue_url: str, exchange: str) -> None:
        self._parameters = broker_parameters(queue_url)
        self._exchange = exchange
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    @property
    def connected(self) -> bool:
        return bool(self._connection and self._connection.is_open and self._channel
                    and self._channel.is_open)

    def connect(self) -> Any:
        """Open the connection and channel unless they are open; returns the channel."""
        if not self.connected:
            self.close()
            try:
                self._connection = pika.BlockingConnection(self._parameters)
                self._channel = self._connection.channel()
                self._channel.exchange_declare(self._exchange, "topic", durable=True)
                self._channel.confirm_delivery()
            except (pika.exceptions.AMQPError, OSError) as error:
                self.close()
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {error!r}") from error
        return self._channel

    def publish(self, message: Mapping[str, Any]) -> None:
        """Publish one envelope persistently; returns only once the broker confirmed it."""
        channel = self.connect()
        headers = message["headers"]
        try:
            channel.basic_publish(
                exchange=self._exchange,
                routing_key=headers["name"],
                body=json.dumps(message, separators=(",", ":")).encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=headers["eventId"],
                    timestamp=headers["createdAt"] // 1000,
                ),
            )
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(f"publish of {headers['name']} failed: {error!r}") from error

    def keep_alive(self) -> None:
        """Service heartbeats while idle so the broker does not drop the connection."""
        if self.connected:
            try:
                self._connection.process_data_events(0)
            except (pika.exceptions.AMQPError, OSError):
                self.close()

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)


class OutboxRelay:
    """Publishes pending events flow by flow, in order, holding a per-flow lease.

    Several relays (API processes, worker replicas) may run at once: the lease in the flow
    document means only one publishes a given flow's events at a time, so events of one
    flow never overtake each other. An event leaves the outbox only after the broker
    confirmed it, so a crash at any point re-publishes (at least once) instead of losing.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        poll_seconds: float = 1.0,
        lease_seconds: float = 30.0,
        batch_size: int = CLAIM_BATCH,
        on_published: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._poll_seconds = poll_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._margin = timedelta(seconds=lease_seconds / 3)
        self._batch_size = batch_size
        self._on_published = on_published
        self._relay_id = uuid.uuid4().hex
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    def wake(self) -> None:
        """Ask the relay to look for pending events now rather than at its next poll."""
        self._wake.set()

    def publish_pending(self) -> int:
        """Publish everything claimable; returns how many events went out."""
        published = 0
        while not self._stop.is_set():
            # One batch of flows is leased at once; a flow another relay holds is skipped.
            flows = self._store.claim_batch(self._relay_id, self._lease, self._batch_size)
            if not flows:
                return published
            sent = self._publish_batch(flows)
            if not sent:
                return published  # leases ran short, or stopping: the next round retries
            published += sent
        return published

    def _publish_batch(self, flows: Sequence[Mapping[str, Any]]) -> int:
        """Publish the leased flows' events, flow by flow and in order; returns how many."""
        sent = 0
        try:
            for flow in flows:
                for event in flow.get("outbox", []):
                    # The lease was written by our own claim; once it runs short another
                    # relay may take the flow over, and publishing on could reorder events.
                    if self._stop.is_set() or utcnow() + self._margin >= flow["relayLeaseUntil"]:
                        return sent
                    self._publisher.publish(envelope(event, flow))  # returns once confirmed
                    self._store.drop_published(flow["_id"], event["eventId"])
                    self._on_published(event["name"])
                    sent += 1
            return sent
        finally:
            self._store.release_batch(
                self._relay_id, [flow["_id"] for flow in flows],
                deleted=[flow["_id"] for flow in flows if flow.get("deletedAt") is not None])

    def run(self) -> None:
        """Relay until stopped, backing off while RabbitMQ or MongoDB are away."""
        delay = 0.0
        while not self._stop.is_set():
            if delay:  # backing off: new writes must not shorten the pause (nor double it)
                self._stop.wait(delay)
            else:
                self._wake.wait(self._poll_seconds)
            self._wake.clear()
            try:
                self._publisher.connect()
                self.publish_pending()
                self._publisher.keep_alive()
                delay = 0.0
            except (BrokerUnavailable, StoreUnavailable) as error:
                delay = back_off(delay, 0.2)
                log.warning("outbox relay paused", extra={"error": str(error), "retryIn": delay})
            except Exception:
                delay = back_off(delay, 0.2)
                log.exception("outbox relay failed", extra={"retryIn": delay})
        self._publisher.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

