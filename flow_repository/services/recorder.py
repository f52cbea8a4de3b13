"""Recording history: pending entries move from a flow document into the history."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from bson import ObjectId

from flow_repository.adapters.store import Lease, Store, StoreUnavailable
from flow_repository.adapters.store.base import recorded_entries

from .entries import pseudonym

log = logging.getLogger(__name__)


class RelayLink(Protocol):
    """What a use case needs of this process's outbox relay."""

    def lease(self) -> Lease: ...

    def hand_off(self, flow: Mapping[str, Any], lease: Lease | None) -> None: ...


class HistoryRecorder:
    """Moves pending history entries from a flow document into the history, idempotently.

    Every write that changes a flow pushes one pending entry into the document's history
    outbox in the same atomic update as the change. The writer then records it here; if it
    dies first, the next write of that flow or the next read of its history records it
    (the entry's revision follows from its place in the outbox). So an applied change
    always has its entry and a refused one (no write) never has one.

    With an outbox relay in this process (``relay``), a write takes the relay's lease along
    and hands the written flow over: the relay records the history and publishes the events.
    """

    def __init__(self, store: Store, *, history_max_revisions: int = 100,
                 relay: RelayLink | None = None) -> None:
        self._store = store
        self._history_max_revisions = history_max_revisions  # 0 keeps every revision
        self._relay = relay  # this process's outbox relay, when it runs one
        self._deferred = threading.local()  # hand-offs held back until a batch commits

    def record_pending_history(self, flows: Sequence[Mapping[str, Any]]
                               ) -> dict[ObjectId, list[str]]:
        """Write the pending history entries of ``flows`` in one call (old ones trimmed);
        returns the entry ids written, per flow, for the caller to drop from the flows."""
        entries = []
        recorded: dict[ObjectId, list[str]] = {}
        for flow in flows:
            written = recorded_entries(flow, flow.get("historyOutbox") or [])
            if written:
                entries += written
                recorded[flow["_id"]] = [entry["entryId"] for entry in written]
        # The change feed first (on MongoDB; SQLite wrote it with the change), then the
        # history: the pending entries leave the documents only after this call, so a
        # failure here retries both.
        self._store.record_history([flow for flow in flows if flow.get("historyOutbox")],
                                   entries)
        self._trim([flow for flow in flows if flow["_id"] in recorded])
        return recorded

    def _trim(self, flows: Sequence[Mapping[str, Any]]) -> None:
        """Drop the history entries older than the newest HISTORY_MAX_REVISIONS of ``flows``."""
        keep = self._history_max_revisions
        for flow in flows:
            if keep and flow["revision"] > keep:
                self._store.history.trim(flow["_id"], flow["revision"] - keep + 1)

    def record(self, flow: Mapping[str, Any]) -> None:
        """Record a flow's pending entries now and drop them from its document."""
        for flow_id, entry_ids in self.record_pending_history([flow]).items():
            self._store.drop_pending_history(flow_id, entry_ids)

    def lease(self, events: Sequence[Any]) -> Lease | None:
        """The relay lease a write queueing ``events`` takes along: None when this process
        runs no relay, or when its relay will have nothing to do with the write (no events,
        and the store writes the history with the change). A write given a lease must give
        back the whole flow: the relay renders the events from it, and records the history
        where the store leaves the entry pending in the flow (the other side of this rule
        is :meth:`after_write`, which hands the relay only such flows)."""
        if self._relay is None or (not events and self._store.history_with_change):
            return None
        return self._relay.lease()

    def after_write(self, flow: Mapping[str, Any], lease: Lease | None) -> None:
        """Hand a flow just written (asking for ``lease``) to this process's relay, which
        records its history and publishes its events; with no relay here, record its
        history now. Inside :meth:`together`, this waits until the batch commits."""
        held = getattr(self._deferred, "writes", None)
        if held is not None:
            held.append((flow, lease))
            return
        if self._store.history_with_change:
            self._trim_after_write(flow)
            if not flow.get("outbox"):
                return  # history written, no event: nothing left for a relay
        if self._relay is not None:
            self._relay.hand_off(flow, lease)
        else:
            self._record_history_after_write(flow)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """The writes made inside, in this thread, as one store transaction where the store
        can; what they wrote goes to the relay only once it is committed (a relay handed a
        write that is then rolled back would publish events of a change that never was)."""
        if getattr(self._deferred, "writes", None) is not None:
            yield  # already inside one
            return
        self._deferred.writes = held = []
        committed = False
        try:
            with self._store.together():
                yield
            committed = True
        finally:
            self._deferred.writes = None
            if committed or not self._store.atomic_batches:
                for flow, lease in held:
                    self.after_write(flow, lease)

    def _trim_after_write(self, flow: Mapping[str, Any]) -> None:
        """Trim after a change whose entry the store wrote with it; a failure here loses
        nothing (the next change of the flow trims)."""
        try:
            self._trim([flow])
        except StoreUnavailable as error:
            log.warning("history left untrimmed", extra={"flowId": str(flow["_id"]),
                                                         "error": str(error)})

    def _record_history_after_write(self, flow: Mapping[str, Any]) -> None:
        """Record right after a change; a failure here loses nothing (the entry waits)."""
        try:
            self.record(flow)
        except StoreUnavailable as error:
            log.warning("history entry left pending", extra={"flowId": str(flow["_id"]),
                                                             "error": str(error)})

    def forget_owner(self, flow_id: ObjectId, owner_id: str) -> None:
        """Replace a deleted owner's id in a flow's history (authors, owners, tenant)."""
        flow = self._store.get(flow_id)
        if flow is not None:
            self.record(flow)  # pending entries are pseudonymised too
        replacement = pseudonym()
        self._store.history.pseudonymise(flow_id, owner_id, replacement)
        self._store.changes.forget_owner(flow_id, owner_id, replacement)
