"""StatusConsumer: reads orchestrator and IAM events from RabbitMQ and applies them via services."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import pika
import pika.exceptions

from .events import back_off, broker_parameters, close_quietly
from .metrics import Metrics
from .services import FlowService, InvalidEvent
from .settings import Settings
from .store import StoreUnavailable, utcnow

log = logging.getLogger(__name__)

STATUS_EVENTS = ("flow.started", "flow.stopped", "flow.failed")
OWNER_EVENTS = ("iam.user.deleted", "iam.tenant.deleted")
BINDINGS = STATUS_EVENTS + OWNER_EVENTS
ORIGINAL_KEY_HEADER = "x-original-routing-key"
FAILURES_REMEMBERED = 10_000


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead-letter"


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

    Handlers are idempotent, so a redelivery (after a crash, a lost ack, a duplicate) is
    harmless. A message that can never apply goes to the dead-letter queue with its reason;
    one that fails unexpectedly is requeued in place (so later events of the same flow stay
    behind it) a few times, then dead-lettered too. A MongoDB outage is not the message's
    fault: it is requeued after a pause, never counted, never dead-lettered.
    """

    def __init__(self, settings: Settings, service: FlowService, metrics: Metrics,
                 *, prefetch: int = 1) -> None:
        self._settings = settings
        self._service = service
        self._metrics = metrics
        self._prefetch = prefetch
        self._queue = settings.event_queue
        self._parameters = broker_parameters(settings.queue_url)
        self._stop = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None
        # Failures per message (its id, or its body's hash): counted here because a
        # requeued message comes back unchanged. A restart forgets them, which only grants
        # a message a few more attempts.
        self._failures: OrderedDict[str, int] = OrderedDict()

    @property
    def connected(self) -> bool:
        return bool(self._connection and self._connection.is_open)

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
                channel.close()  # unacked prefetched messages go back to the queue
            except (pika.exceptions.AMQPError, OSError) as error:
                delay = back_off(delay, 0.5)
                log.warning("consumer disconnected", extra={"error": repr(error),
                                                            "retryIn": delay})
                self._stop.wait(delay)
            finally:
                connection, self._connection = self._connection, None
                close_quietly(connection)

    def _open(self) -> Any:
        self._connection = pika.BlockingConnection(self._parameters)
        channel = self._connection.channel()
        channel.exchange_declare(self._settings.event_exchange, "topic", durable=True)
        channel.queue_declare(self._queue, durable=True)
        channel.queue_declare(dead_letter_queue(self._queue), durable=True)
        for name in BINDINGS:
            channel.queue_bind(self._queue, self._settings.event_exchange, routing_key=name)
        channel.confirm_delivery()  # so a dead-lettered copy is safe before the original is acked
        channel.basic_qos(prefetch_count=self._prefetch)
        channel.basic_consume(self._queue, on_message_callback=self._on_message)
        return channel

    # ------------------------------------------------------------------------- messages

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        name = event_name(method, properties)
        try:
            outcome = self.handle(name, body)
        except InvalidEvent as error:
            self._dead_letter(channel, method, properties, body, str(error))
            return
        except StoreUnavailable as error:
            log.warning("MongoDB unavailable; message requeued",
                        extra={"event": name, "error": str(error)})
            self._stop.wait(2.0)
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        except Exception as error:  # noqa: BLE001 - any bug in a handler must not kill the consumer
            self._retry_or_dead_letter(channel, method, properties, body, error)
            return
        channel.basic_ack(method.delivery_tag)
        self._failures.pop(properties.message_id or hashlib.sha256(body).hexdigest(), None)
        self._metrics.event_consumed(name, "applied")
        log.info("event handled", extra={"event": name, "outcome": outcome})

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

    def _retry_or_dead_letter(self, channel: Any, method: Any, properties: Any,
                              body: bytes, error: Exception) -> None:
        """Requeue a failed message in place (order kept), or dead-letter it at the limit."""
        name = event_name(method, properties)
        key = properties.message_id or hashlib.sha256(body).hexdigest()
        attempts = self._failures.pop(key, 0) + 1
        log.exception("event handler failed", extra={"event": name, "attempts": attempts})
        if attempts >= self._settings.consumer_max_attempts:
            reason = f"failed {attempts} times: {type(error).__name__}: {error}"
            self._dead_letter(channel, method, properties, body, reason)
            return
        self._failures[key] = attempts
        while len(self._failures) > FAILURES_REMEMBERED:
            self._failures.popitem(last=False)
        self._stop.wait(min(0.2 * 2**attempts, 5.0))
        # Back to the head of the queue: later events of the same flow wait behind it.
        channel.basic_nack(method.delivery_tag, requeue=True)
        self._metrics.event_consumed(name, "retried")

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
        channel.basic_publish(
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
        channel.basic_ack(method.delivery_tag)
        self._metrics.event_dead_lettered(name)
        log.warning("event dead-lettered", extra={"event": name, "reason": reason})
