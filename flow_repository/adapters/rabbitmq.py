"""The RabbitMQ side: connection settings, back-off, and the pika publisher with confirms."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pika
import pika.exceptions

log = logging.getLogger(__name__)

CONFIRM_SLICE = 0.002  # seconds: how often the wait for confirms looks at the socket


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
    def exchange(self) -> str:
        return self._exchange

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
                # A channel the broker closes (say, the exchange deleted: 404 at the next
                # message) ends the wait for confirms at once, not at the batch's deadline.
                self._channel._impl.add_on_close_callback(self._on_channel_closed)
                deadline = time.monotonic() + self._parameters.socket_timeout
                while not selected:
                    if time.monotonic() > deadline:
                        raise OSError("RabbitMQ did not answer confirm.select")
                    self._connection.process_data_events(time_limit=CONFIRM_SLICE)
            except (pika.exceptions.AMQPError, OSError) as error:
                self.close()
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {error!r}") from error
        return self._channel

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self._refused = f"RabbitMQ closed the channel: {reason}"

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

    def publish_batch(self, messages: Sequence[Mapping[str, Any]], deadline: float,
                      headers: Sequence[Mapping[str, str]] | None = None) -> int:
        """Publish envelopes persistently, in order; how many of them, from the first on,
        the broker confirmed by ``deadline`` (``time.monotonic()``). ``headers``, aligned
        with ``messages``: AMQP headers of each (the W3C ``traceparent``, ``tracestate``).

        When the deadline passes first, the connection is dropped, so that no message of
        this batch can still reach the broker after a later one published elsewhere.
        BrokerUnavailable (with ``confirmed``) when the broker refused or was lost.
        """
        if not messages:
            return 0
        # The underlying channel only queues each message; the wait for the confirms below
        # sends them together (the blocking channel's own publish flushes every message
        # through a turn of pika's I/O loop: a third of the relay's time went there).
        channel = self.connect()._impl
        first = self._published + 1
        try:
            for position, message in enumerate(messages):
                envelope_headers = message["headers"]
                channel.basic_publish(
                    exchange=self._exchange,
                    routing_key=envelope_headers["name"],
                    body=json.dumps(message, separators=(",", ":")).encode(),
                    properties=pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=pika.DeliveryMode.Persistent,
                        message_id=envelope_headers["eventId"],
                        timestamp=envelope_headers["createdAt"] // 1000,
                        headers=dict(headers[position]) or None if headers else None,
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
