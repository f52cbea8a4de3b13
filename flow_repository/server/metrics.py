"""Prometheus metrics of one process: HTTP traffic, flows by status, outbox and event counts."""

from __future__ import annotations

import os
from datetime import datetime

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from flow_repository.adapters.store import utcnow
from flow_repository.domain.flow import STARTING, STATUSES, STOPPING

PREFIX = "flow_repository"
# Set by flow_repository/server/gunicorn_conf.py when it runs several worker processes, so that a scrape
# answered by any one of them reports the sum over all of them.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Label values come from a fixed set, so no request can add series: any other method is
# "other", and a request that matches no route is counted under route="unmatched".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# The statuses an orchestrator answer is awaited in (flows_overdue's label values).
AWAITING = (STARTING, STOPPING)


class Metrics:
    """A registry of its own per process, so tests and several apps never share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            f"{PREFIX}_http_requests_total", "HTTP requests answered",
            ["method", "route", "status"], registry=self.registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds", "HTTP request latency",
            ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        # Read from the database at scrape time: the most recent reading is the truth.
        self._flows = Gauge(
            f"{PREFIX}_flows", "Stored flows by status", ["status"], registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self._pending = Gauge(
            f"{PREFIX}_outbox_pending_events", "Events stored but not yet confirmed by RabbitMQ",
            registry=self.registry, multiprocess_mode="mostrecent",
        )
        self._oldest = Gauge(
            f"{PREFIX}_outbox_oldest_pending_seconds", "Age of the oldest unpublished event",
            registry=self.registry, multiprocess_mode="mostrecent",
        )
        self._overdue = Gauge(
            f"{PREFIX}_flows_overdue",
            "Flows waiting for the orchestrator longer than START/STOP_TIMEOUT_SECONDS "
            "(counted up to a cap); the reconciler should have moved them",
            ["status"], registry=self.registry, multiprocess_mode="mostrecent",
        )
        self._consumers = Gauge(
            f"{PREFIX}_consumers",
            "Status consumers of this process registered with RabbitMQ (active or standby)",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self._relays = Gauge(
            f"{PREFIX}_relays_connected",
            "Outbox relays of this process connected to RabbitMQ",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self._streams = Gauge(
            f"{PREFIX}_watch_streams", "Open GET /flows/events streams",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self._published = Counter(
            f"{PREFIX}_events_published_total", "Events confirmed by RabbitMQ", ["name"],
            registry=self.registry,
        )
        self._consumed = Counter(
            f"{PREFIX}_events_consumed_total", "Broker messages handled", ["name", "outcome"],
            registry=self.registry,
        )
        self._dead = Counter(
            f"{PREFIX}_events_dead_lettered_total", "Messages sent to the dead-letter queue",
            ["name"], registry=self.registry,
        )

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Count one answered request; ``route`` is the matched rule, None when none matched."""
        method = method if method in KNOWN_METHODS else "other"
        route = route or UNMATCHED_ROUTE
        self._requests.labels(method, route, str(status)).inc()
        self._latency.labels(method, route).observe(seconds)

    def event_published(self, name: str) -> None:
        self._published.labels(name).inc()

    def event_consumed(self, name: str, outcome: str) -> None:
        self._consumed.labels(name, outcome).inc()

    def event_dead_lettered(self, name: str) -> None:
        self._dead.labels(name).inc()

    def set_watch_streams(self, count: int) -> None:
        """This process's open change streams (summed over the live processes)."""
        self._streams.set(count)

    def set_flow_counts(self, counts: dict[str, int]) -> None:
        for status in STATUSES:
            self._flows.labels(status).set(counts.get(status, 0))

    def set_overdue(self, counts: dict[str, int]) -> None:
        for status in AWAITING:
            self._overdue.labels(status).set(counts.get(status, 0))

    def set_links(self, consumers: int, relays: int) -> None:
        """What this process has connected to RabbitMQ right now (read at scrape time)."""
        self._consumers.set(consumers)
        self._relays.set(relays)

    def set_outbox(self, pending: int, oldest: datetime | None) -> None:
        self._pending.set(pending)
        self._oldest.set(0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds()))

    def render(self) -> bytes:
        if os.environ.get(MULTIPROCESS_DIR):
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
