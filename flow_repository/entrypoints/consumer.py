"""StatusConsumer: reads orchestrator and IAM events from RabbitMQ and applies them via services."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions

from flow_repository.adapters.rabbitmq import abandon, back_off, broker_parameters, close_quietly
from flow_repository.adapters.store import StoreUnavailable, utcnow
from flow_repository.adapters.tracing import Tracing
from flow_repository.domain import trace
from flow_repository.server.metrics import Metrics
from flow_repository.services import FlowService, InvalidEvent
from flow_repository.settings import Settings

log = logging.getLogger(__name__)

STATUS_EVENTS = ("flow.started", "flow.stopped", "flow.failed")
OWNER_EVENTS = ("iam.user.deleted", "iam.tenant.deleted")
BINDINGS = STATUS_EVENTS + OWNER_EVENTS
ORIGINAL_KEY_HEADER = "x-original-routing-key"
QUORUM = "quorum"
SINGLE_ACTIVE_CONSUMER = "x-single-active-consumer"
QUEUE_PROCEDURE = "docs/scale.rst, 'Moving an existing queue'"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead-letter"


class QueueMismatch(RuntimeError):
    """The service's queue exists with other arguments than this version declares."""


def queue_arguments(settings: Settings) -> dict[str, Any]:
    """The declaration arguments of the service's queue for EVENT_QUEUE_TYPE.

    Both types: a single active consumer. However many workers consume the queue, the
    broker delivers to one of them at a time (the others stand by and take over when it
    goes), so the reports of one flow are applied in the order the broker received them.
    Quorum, in addition: the broker counts deliveries, so a message that keeps failing (or
    keeps crashing its worker) is dead-lettered by the broker itself after
    CONSUMER_MAX_ATTEMPTS deliveries, whatever happens to the workers. The broker's limit
    counts returns, not deliveries: a limit of N allows N + 1 deliveries.
    """
    arguments: dict[str, Any] = {SINGLE_ACTIVE_CONSUMER: True}
    if settings.event_queue_type == QUORUM:
        arguments.update({
            "x-queue-type": QUORUM,
            "x-delivery-limit": settings.consumer_max_attempts - 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letter_queue(settings.event_queue),
        })
    return arguments


def declare_queues(channel: Any, settings: Settings) -> None:
    """Declare the exchange, the service's queue with its bindings, and the dead-letter queue."""
    channel.exchange_declare(settings.event_exchange, "topic", durable=True)
    extra = {"x-queue-type": QUORUM} if settings.event_queue_type == QUORUM else None
    channel.queue_declare(dead_letter_queue(settings.event_queue), durable=True, arguments=extra)
    try:
        channel.queue_declare(settings.event_queue, durable=True,
                              arguments=queue_arguments(settings))
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:  # PRECONDITION_FAILED: declared before with other arguments
            raise
        raise QueueMismatch(
            f"RabbitMQ refused to declare queue {settings.event_queue!r} with "
            f"{queue_arguments(settings)} (EVENT_QUEUE_TYPE={settings.event_queue_type}): it "
            f"exists with other arguments ({error.reply_text}). An existing queue cannot be "
            f"changed in place; recreate it as described in {QUEUE_PROCEDURE}."
        ) from None
    for name in BINDINGS:
        channel.queue_bind(settings.event_queue, settings.event_exchange, routing_key=name)


def delivery_count(properties: Any) -> int:
    """How often a quorum queue delivered this message before (0 on a classic queue)."""
    count = (properties.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def event_name(method: Any, properties: Any) -> str:
    """The event a delivery carries: its routing key, or the original one of a message
    replayed from the dead-letter queue straight into this queue (default exchange), which
    keeps other subscribers of the event bus from seeing it again.
    """
    original = (properties.headers or {}).get(ORIGINAL_KEY_HEADER)
    if method.exchange == "" and isinstance(original, str):
        return original
    return method.routing_key


class StatusConsumer:
    """Consume the ``flow-repository`` queue; ack only after the database write.

    Up to ``CONSUMER_PREFETCH`` messages are in hand at once; they are handled strictly in
    delivery order, and acknowledged together (``multiple=True``) once written, so the
    broker's round trips do not limit the rate. Handlers are idempotent, so a redelivery
    (after a crash, a lost ack, a duplicate) is harmless.

    A message that can never apply goes to the dead-letter queue with its reason. One that
    fails unexpectedly is retried in place: it stays in hand (later messages, including
    later events of the same flow, wait behind it) and is dead-lettered after
    ``CONSUMER_MAX_ATTEMPTS`` attempts, counting the deliveries a quorum queue reports
    (``x-delivery-count``), so a worker restart does not reset the count. A MongoDB outage
    is not the message's fault: the message waits in hand until MongoDB answers, never
    counted, never dead-lettered; on shutdown it goes back to the queue unacked.

    A message whose headers carry a W3C ``traceparent`` continues that trace: its handling
    is a consumer span of the trace (tracing on), its log lines name the trace, and what
    it causes (a ``flow.stopping`` after ``flow.failed``, the history entry) carries it on.
    """

    def __init__(self, settings: Settings, service: FlowService, metrics: Metrics,
                 tracing: Tracing | None = None) -> None:
        self._settings = settings
        self._tracing = tracing or Tracing()
        self._service = service
        self._metrics = metrics
        self._queue = settings.event_queue
        self._parameters = broker_parameters(settings.queue_url)
        self._stop = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None
        # Delivery tag of the last message settled (applied or dead-lettered) but not yet
        # acknowledged; every message before it is settled too, as they are handled in order.
        self._unacked_tag = 0
        self._unacked_count = 0
        # Set when the message in hand cannot be settled before shutdown: the messages
        # behind it must not overtake it, so they are left unacked too.
        self._halted = False
        # Set when consuming cannot work until an operator acts (the queue's arguments).
        self.failure: QueueMismatch | None = None
        self._consumer_tag: str | None = None
        # The messages one read from the socket delivered, applied together once it ends.
        self._burst: list[tuple[Any, Any, Any, bytes]] = []

    @property
    def connected(self) -> bool:
        return bool(self._connection and self._connection.is_open)

    @property
    def consuming(self) -> bool:
        """Registered with the broker (active, or standing by as a single active consumer)."""
        return self._consumer_tag is not None and self.connected

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="status-consumer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the message in hand, let the broker requeue anything unacked, close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            try:
                channel = self._open()
                delay = 0.0
                log.info("consuming", extra={"queue": self._queue})
                while not self._stop.is_set():
                    self._connection.process_data_events(time_limit=0.2)
                    self._apply_burst()
                    self._ack_settled(channel)
                self._connection.process_data_events(0)  # the acks queued last go out
                # Not channel.close(): pika would cancel the consumer first, the broker would
                # hand the queue to a standby consumer, and the messages held here would
                # return only afterwards, behind later reports of the same flows. Dropping
                # the connection returns them and removes the consumer in one step, in order.
                abandon(self._connection)
            except QueueMismatch as error:
                self.failure = error
                log.error("cannot consume", extra={"queue": self._queue, "error": str(error)})
                return
            except (pika.exceptions.AMQPError, OSError) as error:
                delay = back_off(delay, 0.5)
                log.warning("consumer disconnected", extra={"error": repr(error),
                                                            "retryIn": delay})
                self._stop.wait(delay)
            finally:
                connection, self._connection = self._connection, None
                self._consumer_tag = None
                close_quietly(connection)

    def _open(self) -> Any:
        self._connection = pika.BlockingConnection(self._parameters)
        self._unacked_tag = self._unacked_count = 0
        self._halted = False
        self._burst = []
        channel = self._connection.channel()
        declare_queues(channel, self._settings)
        channel.confirm_delivery()  # so a dead-lettered copy is safe before the original is acked
        channel.basic_qos(prefetch_count=self._settings.consumer_prefetch)
        self._consumer_tag = channel.basic_consume(self._queue,
                                                   on_message_callback=self._on_message)
        return channel

    def _ack_settled(self, channel: Any, *, now: bool = False) -> None:
        """Acknowledge every settled message at once (they are all written already).

        At the end of a turn of the loop the ack is only queued on the connection: the
        loop's next process_data_events sends it at once (flushing it through a turn of
        pika's I/O loop of its own was a sixth of the consumer's time). ``now``: sent
        before this returns."""
        if self._unacked_tag:
            ack = channel.basic_ack if now else channel._impl.basic_ack
            ack(self._unacked_tag, multiple=True)
            self._unacked_tag = self._unacked_count = 0

    def _settled(self, channel: Any, delivery_tag: int) -> None:
        self._unacked_tag = delivery_tag
        self._unacked_count += 1
        # Ack before the window is used up, so the broker keeps sending while we write.
        if self._unacked_count * 2 >= self._settings.consumer_prefetch:
            self._ack_settled(channel, now=True)

    def _pause(self, seconds: float) -> bool:
        """Wait while keeping the connection's heartbeats; False when asked to stop."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self._connection.sleep(min(left, 0.2))
        return False

    # ------------------------------------------------------------------------- messages

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if self._halted or self._stop.is_set():
            # Left unacked: on close it goes back to the queue, in order, for the next
            # consumer (a standby one takes over at once), rather than finished here first.
            self._halted = True
            return
        self._burst.append((channel, method, properties, body))

    def _apply_burst(self) -> None:
        """Apply the messages just delivered, in order: together (one transaction on
        SQLite, acknowledged once it is committed) when there are several, else one by one.

        A message that can never be applied is dead-lettered either way. Anything else
        going wrong in a burst (the database away, a bug) undoes the whole burst, which is
        then applied message by message, each with its own retries. Each message is
        handled in its own trace (the report's ``traceparent``) either way."""
        burst, self._burst = self._burst, []
        if len(burst) > 1 and not self._halted:
            try:
                with self._service.together():
                    outcomes = [self._attempt(method, properties, body)
                                for _, method, properties, body in burst]
            except Exception as error:  # undone: each message is tried on its own below
                log.warning("burst of reports undone; applying them one by one",
                            extra={"messages": len(burst), "error": repr(error)},
                            exc_info=not isinstance(error, StoreUnavailable))
            else:
                for (channel, method, properties, body), outcome in zip(burst, outcomes,
                                                                        strict=True):
                    if isinstance(outcome, InvalidEvent):
                        self._dead_letter(channel, method, properties, body, str(outcome))
                    else:
                        self._applied(channel, method, properties, outcome)
                return
        for channel, method, properties, body in burst:
            if self._halted:
                return  # left unacked, as _on_message leaves what comes after
            with self._traced(method, properties) as span:
                outcome = self._apply_one(channel, method, properties, body)
                self._tracing.annotate(span, attributes={"flow_repository.outcome": outcome},
                                       error=outcome != "applied")

    @contextlib.contextmanager
    def _traced(self, method: Any, properties: Any) -> Iterator[Any]:
        """The message's handling as a span continuing the report's trace (its context is
        current either way, so its history entry, events and log lines carry it)."""
        name = event_name(method, properties)
        headers = properties.headers or {}
        parent = trace.parse(headers.get(trace.TRACEPARENT), headers.get(trace.TRACESTATE))
        attributes = None if not self._tracing.enabled else {
            "messaging.system": "rabbitmq", "messaging.operation.type": "process",
            "messaging.destination.name": self._queue,
            "messaging.rabbitmq.destination.routing_key": name,
            "messaging.message.id": properties.message_id or ""}
        with self._tracing.incoming(f"{name} process", parent, kind="consumer",
                                    attributes=attributes) as span:
            yield span

    def _attempt(self, method: Any, properties: Any, body: bytes) -> str | InvalidEvent:
        with self._traced(method, properties) as span:
            try:
                outcome = self.handle(event_name(method, properties), body)
            except InvalidEvent as error:
                self._tracing.annotate(span, attributes={
                    "flow_repository.outcome": "dead-lettered"}, error=True)
                return error
            self._tracing.annotate(span, attributes={"flow_repository.outcome": "applied"})
            return outcome

    def _applied(self, channel: Any, method: Any, properties: Any, outcome: str) -> None:
        name = event_name(method, properties)
        self._settled(channel, method.delivery_tag)
        self._metrics.event_consumed(name, "applied")
        # DEBUG: one line per report would cost more than applying it; /metrics counts them
        log.debug("event handled", extra={"event": name, "outcome": outcome})

    def _apply_one(self, channel: Any, method: Any, properties: Any, body: bytes) -> str:
        """Apply one message, retrying in place; returns applied, dead-lettered or halted."""
        name = event_name(method, properties)
        # Deliveries a quorum queue has already counted: earlier workers' attempts.
        attempts = delivery_count(properties)
        while True:
            try:
                outcome = self.handle(name, body)
                break
            except InvalidEvent as error:
                self._dead_letter(channel, method, properties, body, str(error))
                return "dead-lettered"
            except StoreUnavailable as error:
                log.warning("MongoDB unavailable; message kept in hand",
                            extra={"event": name, "error": str(error)})
                if not self._pause(2.0):
                    self._halted = True
                    return "halted"
            except Exception as error:  # any bug in a handler must not kill the consumer
                attempts += 1
                log.exception("event handler failed", extra={"event": name,
                                                             "attempts": attempts})
                if attempts >= self._settings.consumer_max_attempts:
                    reason = f"failed {attempts} times: {type(error).__name__}: {error}"
                    self._dead_letter(channel, method, properties, body, reason)
                    return "dead-lettered"
                self._metrics.event_consumed(name, "retried")
                if not self._pause(min(0.2 * 2**attempts, 5.0)):
                    self._halted = True
                    return "halted"
        self._applied(channel, method, properties, outcome)
        return "applied"

    def handle(self, name: str, body: bytes) -> str:
        """Apply one message; InvalidEvent when it can never be applied."""
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidEvent("body is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("payload"), dict):
            raise InvalidEvent("body is not an OIH event: no payload object")
        payload = message["payload"]
        if name in STATUS_EVENTS:
            return self._service.apply_status_event(name, payload)
        if name in OWNER_EVENTS:
            changed = self._service.remove_owner(payload.get("id"))
            return f"{name}: owner removed from {changed} flows"
        raise InvalidEvent(f"no handler for routing key {name!r}")

    def _dead_letter(self, channel: Any, method: Any, properties: Any, body: bytes,
                     reason: str) -> None:
        name = event_name(method, properties)
        headers = dict(properties.headers or {})
        headers.update({
            "x-death-reason": reason,
            ORIGINAL_KEY_HEADER: name,
            "x-original-exchange": method.exchange or headers.get("x-original-exchange", ""),
            "x-dead-lettered-at": utcnow().isoformat(),
        })
        channel.basic_publish(  # confirmed: the copy is safe before the original is acked
            exchange="",
            routing_key=dead_letter_queue(self._queue),
            body=body,
            properties=pika.BasicProperties(
                content_type=properties.content_type,
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=properties.message_id,
                headers=headers,
            ),
        )
        self._settled(channel, method.delivery_tag)
        self._metrics.event_dead_lettered(name)
        log.warning("event dead-lettered", extra={"event": name, "reason": reason})
