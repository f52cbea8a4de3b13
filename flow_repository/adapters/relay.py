"""The outbox relay: publishes each flow's pending events in order, under a per-flow lease."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from flow_repository.adapters.outbox import envelope, trace_of
from flow_repository.adapters.rabbitmq import BrokerUnavailable, Publisher, back_off
from flow_repository.adapters.store import Lease, Store, StoreUnavailable, utcnow
from flow_repository.adapters.tracing import Tracing
from flow_repository.domain import trace

log = logging.getLogger(__name__)

CLAIM_BATCH = 100  # flows the relay leases at once
# Written flows held for the relay at most; beyond it (the relay far behind), a hand-off keeps
# only the flow's id, to give its lease back: the poll then finds the flow.
MAX_HANDED = 1000
WANTED_RETRY_SECONDS = 0.02  # how soon to try again for a flow another relay was finishing
LEASE_STEP = timedelta(milliseconds=1)  # the precision leases are stored at
# Records the pending history entries of flows; returns the ids recorded, per flow.
RecordHistory = Callable[[Sequence[Mapping[str, Any]]], Mapping[Any, Sequence[str]]]


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
        tracing: Tracing | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._poll_seconds = poll_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._margin = timedelta(seconds=lease_seconds / 3)
        self._batch_size = batch_size
        self._on_published = on_published
        self._record_history = record_history
        self._tracing = tracing or Tracing()
        self.relay_id = uuid.uuid4().hex
        self._handed: list[tuple[dict[str, Any], Lease | None]] = []
        self._let_go: set[Any] = set()  # flows leased by writes here, handed over past the bound
        self._handed_lock = threading.Lock()
        self._last_until = utcnow()
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
        return self.relay_id, self._lease_end()

    def _lease_end(self) -> datetime:
        """The end of a lease this relay takes, by a write or by a claim: never the end of
        an earlier one, so a flow read back shows which very write or claim took it. (Two
        in one millisecond would otherwise look alike: a write's lease passed for one the
        relay had just claimed, and the flow was published twice, the second time after
        the release had freed the write's newer lease for another relay.)"""
        with self._handed_lock:
            until = max(utcnow() + self._lease, self._last_until + LEASE_STEP)
            self._last_until = until
        return until

    def wake(self) -> None:
        """Ask the relay to look for pending events now rather than at its next poll."""
        self._wake.set()

    def hand_off(self, flow: Mapping[str, Any], lease: Lease | None) -> None:
        """Take over a flow just written in this process (the whole document as written)
        by a write that asked for ``lease``.

        Documents are held only up to MAX_HANDED: a relay that cannot keep up, or cannot
        publish at all (RabbitMQ away), must not hold every flow written meanwhile."""
        with self._handed_lock:
            if len(self._handed) < MAX_HANDED:
                self._handed.append((dict(flow), lease))
            elif _took(flow, lease):
                self._let_go.add(flow["_id"])
        self._wake.set()

    def relay_handed(self, *, publish: bool = True) -> int:
        """Finish what was handed over; returns how many events went out.

        Without ``publish`` (RabbitMQ is away) the history is recorded and the leases are
        given back, the events left pending for whichever relay can publish them first."""
        with self._handed_lock:
            handed, self._handed = self._handed, []
            let_go, self._let_go = self._let_go, set()
        if not handed and not let_go:
            return 0
        newest: dict[Any, dict[str, Any]] = {}
        taken: dict[Any, Any] = {}  # flow id -> end of a lease a write here took just now
        for flow, lease in handed:
            flow_id = flow["_id"]
            if _took(flow, lease):
                # hand-offs may arrive out of order: the newest lease a write took counts
                taken[flow_id] = max(lease[1], taken.get(flow_id, lease[1]))
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
        return self._finish(list(newest.values()), mine, publish=publish,
                            let_go=let_go - ours)

    def publish_pending(self, flow_ids: Sequence[Any] | None = None) -> int:
        """Publish everything claimable (of ``flow_ids`` only, when given); returns how
        many events went out."""
        published = 0
        while not self._stop.is_set():
            # One batch of flows is leased at once; a flow another relay holds is skipped.
            flows = self._store.claim_batch(self.relay_id, self._lease_end(),
                                            self._batch_size, flow_ids)
            if not flows:
                return published
            sent = self._finish(flows, flows)
            if not sent or flow_ids is not None:
                return published + sent  # leases ran short, or stopping: the next round retries
            published += sent
        return published

    def sweep(self) -> int:
        """Record the history entries that writers left pending: those of live flows no
        relay holds, pending for longer than the lease margin (their writer died before it
        recorded them, or the store was away then), which nothing else would record before
        the flow's next write or history read. Returns how many flows it found."""
        flows = self._store.unrecorded(utcnow() - self._margin, self._batch_size)
        if flows:
            self._finish(flows, (), publish=False)
            log.info("recorded history entries left pending", extra={"flows": len(flows)})
        return len(flows)

    def _finish(self, flows: Sequence[Mapping[str, Any]],
                leased: Sequence[Mapping[str, Any]], *, publish: bool = True,
                let_go: Collection[Any] = ()) -> int:
        """Record the flows' pending history, publish the leased ones' events (unless not
        to ``publish``), and drop what went out and give the leases back (those of the
        ``let_go`` flows too) in one store call; returns how many events went out."""
        recorded = self._record_history(flows) if flows else {}
        published: dict[Any, list[str]] = {flow_id: [] for flow_id in let_go}
        published.update((flow["_id"], []) for flow in leased)
        deleted: list[Any] = []
        try:
            sent = self._publish(leased, published) if publish else 0
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
        # Each event goes out with the trace context stored with it (tracing on: that of a
        # publish span of its own, a child of the stored one) in its message headers.
        spans, headers = [], []
        for _flow, event in batch:
            span, context = self._tracing.start_publish(
                event["name"], trace_of(event), self._publisher.exchange, event["eventId"])
            spans.append(span)
            headers.append(trace.headers_of(context))
        confirmed = 0
        failure: BaseException | None = None
        try:
            confirmed = self._publisher.publish_batch(
                [envelope(event, flow) for flow, event in batch], deadline, headers)
        except BrokerUnavailable as error:
            confirmed = error.confirmed
            failure = error
            raise
        finally:
            for flow, event in batch[:confirmed]:
                published[flow["_id"]].append(event["eventId"])
                self._on_published(event["name"])
            for position, span in enumerate(spans):
                self._tracing.end(span, None if position < confirmed
                                  else failure or "not confirmed by RabbitMQ in time")
        return confirmed

    def run(self) -> None:
        """Relay until stopped, backing off while RabbitMQ or MongoDB are away."""
        delay = 0.0
        next_poll = next_sweep = 0.0
        while not self._stop.is_set():
            if delay:  # backing off: new writes must not shorten the pause (nor double it)
                self._stop.wait(delay)
            else:
                self._wake.wait(self._retry_in() or max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            try:
                if time.monotonic() >= next_sweep:  # RabbitMQ or not: it publishes nothing
                    # due again in a margin even if it fails, so it cannot hold up publishing
                    next_sweep = time.monotonic() + self._margin.total_seconds()
                    self.sweep()
                try:
                    self._publisher.connect()
                except BrokerUnavailable:
                    self.relay_handed(publish=False)  # nothing written piles up meanwhile
                    raise
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


def _took(flow: Mapping[str, Any], lease: Lease | None) -> bool:
    """Whether the write that asked for ``lease`` took it: the flow as written holds it."""
    return lease is not None and (flow.get("relayLeaseOwner"), flow.get("relayLeaseUntil")) == lease
