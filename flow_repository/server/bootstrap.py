"""The parts one process runs: store, service, and the background relay, consumer and reconciler."""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from flow_repository.adapters.rabbitmq import Publisher
from flow_repository.adapters.references import ReferenceChecker
from flow_repository.adapters.relay import OutboxRelay
from flow_repository.adapters.step_logs import StepLogClient
from flow_repository.adapters.store import Store, StoreUnavailable, open_store, utcnow
from flow_repository.adapters.tracing import Tracing, build_tracing
from flow_repository.domain import flow as domain
from flow_repository.server.metrics import Metrics
from flow_repository.services import FlowService
from flow_repository.services.watch import ChangeWatch, WatchLimits
from flow_repository.settings import Settings

log = logging.getLogger(__name__)

FEED_TRIM_SECONDS = 60.0  # how often a relaying process trims the change feed


class Consumer(Protocol):
    """What a process runs to apply the orchestrator's reports (the entry points' consumer)."""

    connected: bool

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...


ConsumerFactory = Callable[[Settings, FlowService, Metrics, Tracing], Consumer]

OVERDUE_CAP = 100  # overdue flows counted per status and re-send count, at most, per scrape


class Periodic:
    """Call ``action`` every ``interval`` seconds on a daemon thread until stopped."""

    def __init__(self, name: str, interval: float, action: Callable[[], Any]) -> None:
        self._name = name
        self._interval = interval
        self._action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._action()
            except StoreUnavailable as error:
                log.warning(f"{self._name} paused", extra={"error": str(error)})
            except Exception:
                log.exception(f"{self._name} failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def turn_locks(database: str) -> tuple[str, str]:
    """The lock files beside an embedded database: (the API workers' consumer turn, the
    presence of ``worker`` processes)."""
    return f"{database}.consumer-lock", f"{database}.workers-lock"


def _lock_file(path: str) -> int:
    # a worker may start before serve has created the database's directory
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def database_in_use(database: str) -> bool:
    """True while a ``serve`` or ``worker`` process uses the embedded database file (it
    holds one of the lock files beside it)."""
    for path in turn_locks(database):
        if not os.path.exists(path):
            continue
        descriptor = _lock_file(path)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
    return False


class WorkerPresence:
    """Held by every ``worker`` process on an embedded database file while it runs: the
    API workers sharing the file then leave consuming and reconciling to the workers."""

    def __init__(self, database: str) -> None:
        self._descriptor = _lock_file(turn_locks(database)[1])
        # shared: any number of workers; an API worker only ever tests it for a moment
        fcntl.flock(self._descriptor, fcntl.LOCK_SH)

    def close(self) -> None:
        os.close(self._descriptor)  # the lock goes with the descriptor (and with the process)


class ConsumerTurn:
    """Embedded ``serve`` on a file: the status consumer and the reconciler run in exactly
    one API worker at a time, and in none while a ``worker`` process shares the database.

    The API worker holding the consumer lock (``flock``, exclusive) consumes; the others
    try again every ``interval`` seconds. The kernel releases a process's locks when it
    exits or is killed, so another worker takes the turn within ``interval``. While any
    ``worker`` process holds its shared presence lock, the holder stops consuming (the
    production topology: the API serves and relays, the workers consume), and it starts
    again once the last worker is gone, so ``serve`` alone always runs the whole lifecycle.
    """

    def __init__(self, runtime: Runtime, database: str, interval: float = 1.0) -> None:
        self._runtime = runtime
        turn, workers = turn_locks(database)
        self._turn = _lock_file(turn)
        self._workers = _lock_file(workers)
        self._interval = interval
        self._held = False
        self._reconciler: Periodic | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer-turn", daemon=True)

    def start(self) -> None:
        self._tick()  # at once, so that a lone process consumes as soon as it starts
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception:
                log.exception("consumer turn failed")

    def _workers_present(self) -> bool:
        try:
            fcntl.flock(self._workers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._workers, fcntl.LOCK_UN)
        return False

    def _tick(self) -> None:
        if not self._held:
            try:
                fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another API worker consumes
            self._held = True
        runtime = self._runtime
        if self._workers_present():
            if runtime.consumer is not None:
                log.info("worker processes share the database: they consume, not this one")
                self._stand_down()
        elif runtime.consumer is None:
            settings = runtime.settings
            runtime.consumer = runtime.consumer_factory(settings, runtime.service,
                                                        runtime.metrics, runtime.tracing)
            runtime.consumer.start()
            self._reconciler = Periodic("reconciler", settings.reconcile_interval_seconds,
                                        runtime.service.reconcile)
            self._reconciler.start()

    def _stand_down(self) -> None:
        if self._runtime.consumer is not None:
            self._runtime.consumer.stop()
            self._runtime.consumer = None
        if self._reconciler is not None:
            self._reconciler.stop()
            self._reconciler = None

    def stop(self) -> None:
        """Stop consuming and give the turn back (another API worker takes it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._stand_down()
        os.close(self._turn)
        os.close(self._workers)


@dataclass
class Runtime:
    """What a process holds: the store and service, plus whichever background loops it runs."""

    settings: Settings
    store: Store
    service: FlowService
    metrics: Metrics
    relay: OutboxRelay | None = None
    consumer: Consumer | None = None
    consumer_factory: ConsumerFactory | None = None
    loops: list[Periodic] = field(default_factory=list)
    turn: ConsumerTurn | None = None
    watch: ChangeWatch | None = None  # GET /flows/events streams of this process
    clock: Callable[[], float] = time.monotonic  # when the flow counts were last read
    tracing: Tracing = field(default_factory=Tracing)
    owns_tracing: bool = False  # built here (so shut down here), not handed in
    _counts_read_at: float | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        store: Store | None = None,
        relay: bool = False,
        consumer: ConsumerFactory | None = None,
        reconciler: bool = False,
        take_turns: bool = False,
        tracing: Tracing | None = None,
    ) -> Runtime:
        """The parts of one process. ``consumer``: how to build the status consumer, when
        this process consumes (the entry points hand theirs in). ``take_turns`` (embedded
        ``serve`` on a file): the consumer and the reconciler run only during this
        process's ConsumerTurn. ``tracing``: default, as the OTEL_* settings ask (one
        provider per process)."""
        owns_tracing = tracing is None
        tracing = (tracing or build_tracing(settings)).with_system(
            "sqlite" if settings.embedded else "mongodb")
        store = tracing.store(store or open_store(settings))
        try:
            store.ensure_indexes()
        except StoreUnavailable as error:
            log.error("could not create indexes; MongoDB is unavailable", extra={"error": str(error)})
        metrics = Metrics()
        outbox = None
        if relay:
            outbox = OutboxRelay(
                store,
                Publisher(settings.queue_url, settings.event_exchange),
                poll_seconds=settings.relay_poll_seconds,
                lease_seconds=settings.relay_lease_seconds,
                on_published=metrics.event_published,
                # the history rules live in the service, built next
                record_history=lambda flows: service.record_pending_history(flows),
                tracing=tracing,
            )
        service = FlowService(
            store,
            timeouts=domain.Timeouts(settings.start_timeout_seconds, settings.stop_timeout_seconds),
            bulk_max_items=settings.bulk_max_items,
            history_max_revisions=settings.history_max_revisions,
            references=ReferenceChecker(settings),
            relay=outbox,
            step_logs=StepLogClient(settings.logging_service_base_url, settings.iam_token,
                                    settings.logging_service_timeout_seconds)
            if settings.logging_service_base_url else None,
            ownership_policy=settings.ownership_policy,
            max_list_bytes=settings.max_list_bytes,
        )
        runtime = cls(settings, store, service, metrics, outbox, consumer_factory=consumer,
                      tracing=tracing, owns_tracing=owns_tracing)
        runtime.watch = ChangeWatch(store, WatchLimits(
            max_watchers=settings.max_watchers,
            max_per_caller=settings.max_watchers_per_caller,
            poll_seconds=settings.watch_poll_seconds, gap_seconds=settings.watch_gap_seconds,
            retention_seconds=settings.watch_retention_seconds),
            on_count=metrics.set_watch_streams)
        if relay:  # every process that relays also trims the change feed (idempotent)
            runtime.loops.append(Periodic("change-feed-trim", FEED_TRIM_SECONDS,
                                          runtime.watch.trim))
        if take_turns and (consumer or reconciler):
            runtime.turn = ConsumerTurn(runtime, settings.embedded_database)
            return runtime
        if consumer:
            runtime.consumer = consumer(settings, service, metrics, tracing)
        if reconciler:
            runtime.loops.append(
                Periodic("reconciler", settings.reconcile_interval_seconds, service.reconcile)
            )
        return runtime

    def start(self) -> None:
        if self.relay:
            self.relay.start()
        if self.turn:
            self.turn.start()
        elif self.consumer:
            self.consumer.start()
        for loop in self.loops:
            loop.start()

    def stop(self) -> None:
        """Stop consuming first, so that no new work arrives, then the loops and the relay."""
        if self.watch:
            self.watch.shutdown()
        if self.turn:
            self.turn.stop()
        elif self.consumer:
            self.consumer.stop()
        for loop in self.loops:
            loop.stop()
        if self.relay:
            self.relay.stop()
        if self.owns_tracing:
            self.tracing.shutdown()

    def health(self, *, queue_required: bool) -> tuple[int, dict[str, Any]]:
        """The HTTP status and body of /healthcheck for this process.

        MongoDB down is a failure (503). A queue outage fails only a process whose job is
        the queue (the worker); the API keeps serving and its events wait in the outbox,
        so it answers 200 with status ``warn``.
        """
        details: dict[str, Any] = {}
        try:
            self.store.ping()
            details["mongoDB"] = {"status": "pass"}
        except StoreUnavailable as error:
            details["mongoDB"] = {"status": "fail", "error": str(error)}
        links = [part for part in (self.relay, self.consumer) if part is not None]
        if links:
            connected = all(part.connected for part in links)
            details["queue"] = {"status": "pass" if connected else "fail",
                                "connected": connected}
        else:
            details["queue"] = {"status": "pass", "connected": None,
                                "note": "this process does not use the queue"}
        mongo_ok = details["mongoDB"]["status"] == "pass"
        queue_ok = details["queue"]["status"] == "pass"
        if mongo_ok and queue_ok:
            return 200, {"status": "pass", "details": details}
        if mongo_ok and not queue_required:
            return 200, {"status": "warn", "details": details}
        return 503, {"status": "fail", "details": details}

    def metrics_allowed(self, authorization: str | None) -> bool:
        """True when /metrics is public or ``authorization`` is ``Bearer <METRICS_TOKEN>``."""
        token = self.settings.metrics_token
        if not token:
            return True
        return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())

    def metrics_text(self) -> bytes:
        """Prometheus text, with the outbox gauges read from the store just now.

        The outbox backlog is read from the pending index (it costs what is pending, not
        what is stored). The flows per status are counted at most once every
        METRICS_FLOW_COUNT_SECONDS: one index count per status, never a scan per scrape.
        """
        consumer, relay = self.consumer, self.relay
        self.metrics.set_links(int(consumer is not None and consumer.consuming),
                               int(relay is not None and relay.connected))
        try:
            pending, oldest = self.store.outbox_backlog()
            self.metrics.set_outbox(pending, oldest)
            now = self.clock()
            read_at = self._counts_read_at
            if read_at is None or now - read_at >= self.settings.metrics_flow_count_seconds:
                self.metrics.set_flow_counts(self.store.count_by_status(domain.STATUSES))
                self.metrics.set_overdue(self.overdue_counts())
                self._counts_read_at = now
        except StoreUnavailable:
            pass  # the counters are still worth scraping while MongoDB is away
        return self.metrics.render()

    def overdue_counts(self, cap: int = OVERDUE_CAP) -> dict[str, int]:
        """Flows in starting or stopping for longer than their timeout, ``cap`` at most
        per status and re-send count: the reconciler's own index-backed scan, bounded."""
        timeouts = domain.Timeouts(self.settings.start_timeout_seconds,
                                   self.settings.stop_timeout_seconds)
        counts = {}
        for status in (domain.STARTING, domain.STOPPING):
            total = 0
            for retries in (0, 1):
                _, timeout = timeouts.plan(status, retries)
                overdue = utcnow() - timedelta(seconds=timeout)
                total += len(self.store.stuck(status, overdue, retries=retries, limit=cap))
            counts[status] = total
        return counts
