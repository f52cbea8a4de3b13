"""OIH event envelope, the pika publisher with confirms, and the outbox relay that uses it."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pika
import pika.exceptions

from .domain import public_flow
from .store import Lease, Store, StoreUnavailable, utcnow

log = logging.getLogger(__name__)

SERVICE_NAME = "flow-repository"
FLOW_PAYLOAD = "flow"  # the payload is the flow itself, rendered when the event is published
CLAIM_BATCH = 100  # flows the relay leases at once
CONFIRM_SLICE = 0.002  # seconds: how often the wait for confirms looks at the socket
WANTED_RETRY_SECONDS = 0.02  # how soon to try again for a flow another relay was finishing
# Records the pending history entries of flows; returns the ids recorded, per flow.
RecordHistory = Callable[[Sequence[Mapping[str, Any]]], Mapping[Any, Sequence[str]]]


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
    """RabbitMQ refused, dropped the connection or did not confirm a message.

    ``confirmed``: how many messages of the batch, from the first on, it had confirmed.
    """

    def __init__(self, message: Any, confirmed: int = 0) -> None:
        super().__init__(message)
        self.confirmed = confirmed


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


def abandon(connection: pika.BlockingConnection | None) -> None:
    """Drop a connection at once, as a crashed process's would be (no cancel, no close)."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    sock = getattr(transport, "_sock", None)
    if sock is None:  # not connected, or another pika version: close as usual
        close_quietly(connection)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        connection.process_data_events(0)  # pika sees the stream end and lets go
    except (pika.exceptions.AMQPError, OSError):
        pass


def back_off(delay: float, first: float) -> float:
    """The next pause after a failure: ``first``, then doubling, at most 10 seconds."""
    return min(max(delay * 2, first), 10.0)


class Publisher:
    """One pika connection in confirm mode; use it from a single thread only.

    Messages are published back to back and their confirms collected together, so a batch
    costs about one round trip to the broker rather than one per message.
    """

    def __init__(self, queue_url: str, exchange: str) -> None:
        self._parameters = broker_parameters(queue_url)
        self._exchange = exchange
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._published = 0  # delivery tags handed out on this channel (they start at 1)
        self._confirmed = 0  # every tag up to this one is confirmed
        self._acked: set[int] = set()  # confirmed tags above ``_confirmed``
        self._refused: str | None = None

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
                self._published = self._confirmed = 0
                self._acked.clear()
                self._refused = None
                # Confirm mode on the underlying channel, with our own callback: the
                # blocking channel's own confirm mode waits for each message in turn.
                selected: list[bool] = []
                self._channel._impl.confirm_delivery(self._on_confirm,
                                                     lambda _frame: selected.append(True))
                deadline = time.monotonic() + self._parameters.socket_timeout
                while not selected:
                    if time.monotonic() > deadline:
                        raise OSError("RabbitMQ did not answer confirm.select")
                    self._connection.process_data_events(time_limit=CONFIRM_SLICE)
            except (pika.exceptions.AMQPError, OSError) as error:
                self.close()
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {error!r}") from error
        return self._channel

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._refused = f"RabbitMQ refused message {method.delivery_tag}"
            return
        if method.multiple:
            self._confirmed = max(self._confirmed, method.delivery_tag)
        else:
            self._acked.add(method.delivery_tag)
        while self._confirmed + 1 in self._acked:
            self._confirmed += 1
            self._acked.discard(self._confirmed)
        self._acked = {tag for tag in self._acked if tag > self._confirmed}

    def publish_batch(self, messages: Sequence[Mapping[str, Any]], deadline: float) -> int:
        """Publish envelopes persistently, in order; how many of them, from the first on,
        the broker confirmed by ``deadline`` (``time.monotonic()``).

        When the deadline passes first, the connection is dropped, so that no message of
        this batch can still reach the broker after a later one published elsewhere.
        BrokerUnavailable (with ``confirmed``) when the broker refused or was lost.
        """
        if not messages:
            return 0
        channel = self.connect()
        first = self._published + 1
        try:
            for message in messages:
                headers = message["headers"]
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
                self._published += 1
            while self._confirmed < self._published and self._refused is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # short slices: a confirm ends no slice early (it is not a channel event)
                self._connection.process_data_events(time_limit=min(left, CONFIRM_SLICE))
        except (pika.exceptions.AMQPError, OSError) as error:
            confirmed = max(0, self._confirmed - first + 1)
            self.close()
            raise BrokerUnavailable(f"publish failed: {error!r}", confirmed) from error
        confirmed = max(0, min(self._confirmed, self._published) - first + 1)
        if self._refused is not None:
            refused = self._refused
            self.close()
            raise BrokerUnavailable(refused, confirmed)
        if confirmed < len(messages):
            log.warning("publish deadline passed; dropping the connection",
                        extra={"confirmed": confirmed, "published": len(messages)})
            abandon(self._connection)
            self.close()
        return confirmed

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

    A write in this process usually takes the lease along (:meth:`lease`) and hands the
    written flow over (:meth:`hand_off`): the relay records its pending history entries and
    publishes its events without claiming it first. Whatever it was handed, claimed or
    found by its poll is finished together: one history write, the events published back
    to back, one store call that drops what went out and gives the leases back.
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
        record_history: RecordHistory = lambda flows: {},
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._poll_seconds = poll_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._margin = timedelta(seconds=lease_seconds / 3)
        self._batch_size = batch_size
        self._on_published = on_published
        self._record_history = record_history
        self.relay_id = uuid.uuid4().hex
        self._handed: list[tuple[dict[str, Any], Lease | None]] = []
        self._handed_lock = threading.Lock()
        # Flows written here whose lease another relay held: claimed as soon as it is free.
        self._wanted: dict[Any, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    def lease(self) -> Lease:
        """The lease a write takes along for this relay."""
        return self.relay_id, utcnow() + self._lease

    def wake(self) -> None:
        """Ask the relay to look for pending events now rather than at its next poll."""
        self._wake.set()

    def hand_off(self, flow: Mapping[str, Any], lease: Lease | None) -> None:
        """Take over a flow just written in this process (the whole document as written)
        by a write that asked for ``lease``."""
        with self._handed_lock:
            self._handed.append((dict(flow), lease))
        self._wake.set()

    def relay_handed(self) -> int:
        """Finish what was handed over; returns how many events went out."""
        with self._handed_lock:
            handed, self._handed = self._handed, []
        if not handed:
            return 0
        newest: dict[Any, dict[str, Any]] = {}
        taken: dict[Any, Any] = {}  # flow id -> end of a lease a write here took just now
        for flow, lease in handed:
            flow_id = flow["_id"]
            if lease is not None and (flow.get("relayLeaseOwner"),
                                      flow.get("relayLeaseUntil")) == lease:
                taken[flow_id] = lease[1]
            if flow_id not in newest or flow["revision"] > newest[flow_id]["revision"]:
                newest[flow_id] = flow
        # A flow is ours to publish when a write here took its lease and the newest version
        # written still holds that same lease: its outbox lists every event still pending.
        mine = [flow for flow_id, flow in newest.items()
                if flow_id in taken and flow.get("relayLeaseOwner") == self.relay_id
                and flow.get("relayLeaseUntil") == taken[flow_id]]
        ours = {flow["_id"] for flow in mine}
        for flow_id, flow in newest.items():
            if flow.get("outbox") and flow_id not in ours:
                self._wanted.setdefault(flow_id, time.monotonic())
        return self._finish(list(newest.values()), mine)

    def publish_pending(self, flow_ids: Sequence[Any] | None = None) -> int:
        """Publish everything claimable (of ``flow_ids`` only, when given); returns how
        many events went out."""
        published = 0
        while not self._stop.is_set():
            # One batch of flows is leased at once; a flow another relay holds is skipped.
            flows = self._store.claim_batch(self.relay_id, self._lease, self._batch_size,
                                            flow_ids)
            if not flows:
                return published
            sent = self._finish(flows, flows)
            if not sent or flow_ids is not None:
                return published + sent  # leases ran short, or stopping: the next round retries
            published += sent
        return published

    def _finish(self, flows: Sequence[Mapping[str, Any]],
                leased: Sequence[Mapping[str, Any]]) -> int:
        """Record the flows' pending history, publish the leased ones' events, and drop
        what went out in one store call; returns how many events went out."""
        recorded = self._record_history(flows)
        published: dict[Any, list[str]] = {flow["_id"]: [] for flow in leased}
        deleted: list[Any] = []
        try:
            sent = self._publish(leased, published)
        finally:
            for flow in leased:
                if flow.get("deletedAt") is not None \
                        and len(published[flow["_id"]]) == len(flow.get("outbox", [])):
                    deleted.append(flow["_id"])
            self._store.finish_batch(self.relay_id, published=published, recorded=recorded,
                                     deleted=deleted)
        for flow in leased:
            self._wanted.pop(flow["_id"], None)
        return sent

    def _publish(self, flows: Sequence[Mapping[str, Any]],
                 published: dict[Any, list[str]]) -> int:
        """Publish the events of the leased ``flows`` back to back, flow by flow in order;
        fills ``published`` with the confirmed ones and returns how many."""
        now = utcnow()
        # A lease running short may pass to another relay, which could then publish a
        # flow's next event first: flows whose lease ends within the margin are left, and
        # the confirms are awaited no longer than the earliest lease allows.
        ready = [flow for flow in flows
                 if flow.get("outbox") and now + self._margin < flow["relayLeaseUntil"]]
        if not ready or self._stop.is_set():
            return 0
        earliest = min(flow["relayLeaseUntil"] for flow in ready)
        deadline = time.monotonic() + (earliest - self._margin - now).total_seconds()
        batch = [(flow, event) for flow in ready for event in flow["outbox"]]
        confirmed = 0
        try:
            confirmed = self._publisher.publish_batch(
                [envelope(event, flow) for flow, event in batch], deadline)
        except BrokerUnavailable as error:
            confirmed = error.confirmed
            raise
        finally:
            for flow, event in batch[:confirmed]:
                published[flow["_id"]].append(event["eventId"])
                self._on_published(event["name"])
        return confirmed

    def run(self) -> None:
        """Relay until stopped, backing off while RabbitMQ or MongoDB are away."""
        delay = 0.0
        next_poll = 0.0
        while not self._stop.is_set():
            if delay:  # backing off: new writes must not shorten the pause (nor double it)
                self._stop.wait(delay)
            else:
                self._wake.wait(self._retry_in() or max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            try:
                self._publisher.connect()
                self.relay_handed()
                self._claim_wanted()
                if delay or time.monotonic() >= next_poll:
                    self.publish_pending()
                    next_poll = time.monotonic() + self._poll_seconds
                self._publisher.keep_alive()
                delay = 0.0
            except (BrokerUnavailable, StoreUnavailable) as error:
                delay = back_off(delay, 0.2)
                log.warning("outbox relay paused", extra={"error": str(error), "retryIn": delay})
            except Exception:
                delay = back_off(delay, 0.2)
                log.exception("outbox relay failed", extra={"retryIn": delay})
        self._publisher.close()

    def _retry_in(self) -> float | None:
        """How soon to try the wanted flows again: soon, as their holder is about done."""
        return WANTED_RETRY_SECONDS if self._wanted else None

    def _claim_wanted(self) -> None:
        """Claim the flows whose lease another relay held when they were written."""
        if not self._wanted:
            return
        give_up = time.monotonic() - self._lease.total_seconds()
        for flow_id, since in list(self._wanted.items()):
            if since < give_up:  # the poll finds it; its holder may have died with it
                del self._wanted[flow_id]
        ids = list(self._wanted)
        if ids:
            self.publish_pending(ids)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
