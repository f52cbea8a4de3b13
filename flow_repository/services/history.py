"""History use cases: recording every revision of a flow, listing, reading, diffing, restoring."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jsonpatch
from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import Lease, StoreUnavailable, utcnow
from flow_repository.contract import EDITABLE_FIELDS
from flow_repository.domain import flow as domain
from flow_repository.domain.flow import FlowNotFound, InvalidFlow, iso

from .common import Saved, UseCases, parse_flow_id

log = logging.getLogger(__name__)

DEFINITION = "definition"
STATUS = "status"
OWNERS = "owners"
DELETED = "deleted"
# What a definition entry keeps of the flow: what a client writes, and the tenant.
DEFINITION_FIELDS = (*EDITABLE_FIELDS, "tenant")


def definition_of(flow: Mapping[str, Any]) -> dict[str, Any]:
    """The definition of a flow (fields a client writes, and its tenant); null means absent."""
    return {key: flow[key] for key in DEFINITION_FIELDS if flow.get(key) is not None}


def _entry(kind: str, change: str, sub: str | None, at: datetime, **fields: Any) -> dict:
    return {"entryId": uuid.uuid4().hex, "kind": kind, "change": change, "sub": sub,
            "at": at, **fields}


def definition_entry(sub: str, change: str, flow: Mapping[str, Any], **fields: Any) -> dict:
    """A pending entry for a definition change: the whole flow as the change leaves it,
    at the time the change gives it (``updatedAt``)."""
    return _entry(DEFINITION, change, sub, flow.get("updatedAt") or utcnow(),
                  flow=definition_of(flow), **fields)


def status_entry(transition: domain.Transition, source: str, at: datetime,
                 sub: str | None = None) -> dict:
    """A pending entry for a status change: from, to and reason, no copy of the flow."""
    return _entry(STATUS, transition.name, sub, at, status={
        "from": source, "to": transition.target, "reason": transition.reason})


def owner_removed_entry() -> dict:
    """A pending entry for an owner deleted in IAM (the id itself is not kept)."""
    return _entry(OWNERS, "owner deleted in IAM", None, utcnow())


def deleted_entry(sub: str) -> dict:
    """The entry of a deletion; it never reaches the history, which goes with the flow."""
    return _entry(DELETED, "deleted", sub, utcnow())


def pseudonym() -> str:
    """What replaces a deleted user's or tenant's id in a flow's history: random, so it
    cannot be traced back to the id, and the same across that flow's entries."""
    return f"deleted-{uuid.uuid4().hex[:16]}"


def public_entry(flow_id: ObjectId, entry: Mapping[str, Any],
                 flow: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A history entry as clients see it; ``flow`` is the definition in force, if kept."""
    result: dict[str, Any] = {"revision": entry["revision"], "kind": entry["kind"],
                              "change": entry["change"], "sub": entry.get("sub"),
                              "at": iso(entry["at"])}
    if "status" in entry:
        result["status"] = dict(entry["status"])
    if "restoredFrom" in entry:
        result["restoredFrom"] = entry["restoredFrom"]
    if flow is not None:
        result["flow"] = {"id": str(flow_id), **flow["flow"], "revision": flow["revision"]}
    return result


class HistoryRecorder(UseCases):
    """Moves pending history entries from a flow document into the history, idempotently.

    Every write that changes a flow pushes one pending entry into the document's history
    outbox in the same atomic update as the change. The writer then records it here; if it
    dies first, the next write of that flow or the next read of its history records it
    (the entry's revision follows from its place in the outbox). So an applied change
    always has its entry and a refused one (no write) never has one.
    """

    def record_pending_history(self, flows: Sequence[Mapping[str, Any]]
                               ) -> dict[ObjectId, list[str]]:
        """Write the pending history entries of ``flows`` in one call (old ones trimmed);
        returns the entry ids written, per flow, for the caller to drop from the flows."""
        entries = []
        recorded: dict[ObjectId, list[str]] = {}
        for flow in flows:
            pending = flow.get("historyOutbox") or []
            if not pending or flow.get("deletedAt") is not None:
                continue  # a deleted flow's history is dropped with it
            first = flow["revision"] - len(pending) + 1
            entries += [{**entry, "flowId": flow["_id"], "revision": first + offset}
                        for offset, entry in enumerate(pending)]
            recorded[flow["_id"]] = [entry["entryId"] for entry in pending]
        history = self._store.history
        history.record(entries)
        keep = self._history_max_revisions
        for flow in flows:
            if keep and flow["_id"] in recorded and flow["revision"] > keep:
                history.trim(flow["_id"], flow["revision"] - keep + 1)
        return recorded

    def _record_history(self, flow: Mapping[str, Any]) -> None:
        for flow_id, entry_ids in self.record_pending_history([flow]).items():
            self._store.drop_pending_history(flow_id, entry_ids)

    def _after_write(self, flow: Mapping[str, Any], lease: Lease | None) -> None:
        """Hand a flow just written (asking for ``lease``) to this process's relay, which
        records its history and publishes its events; with no relay here, record its
        history now."""
        if self._relay is not None:
            self._relay.hand_off(flow, lease)
        else:
            self._record_history_after_write(flow)

    def _record_history_after_write(self, flow: Mapping[str, Any]) -> None:
        """Record right after a change; a failure here loses nothing (the entry waits)."""
        try:
            self._record_history(flow)
        except StoreUnavailable as error:
            log.warning("history entry left pending", extra={"flowId": str(flow["_id"]),
                                                             "error": str(error)})

    def _forget_in_history(self, flow_id: ObjectId, owner_id: str) -> None:
        """Replace a deleted owner's id in a flow's history (authors, owners, tenant)."""
        flow = self._store.get(flow_id)
        if flow is not None:
            self._record_history(flow)  # pending entries are pseudonymised too
        self._store.history.pseudonymise(flow_id, owner_id, pseudonym())


class HistoryUseCases(HistoryRecorder):
    """What a client reads of a flow's history, and restoring an earlier revision."""

    # FlowUseCases.update, which FlowService mixes in beside this class.
    update: Callable[..., Saved]

    def _visible_with_history(self, principal: Principal, raw_id: Any) -> dict[str, Any]:
        flow = self._visible(principal, parse_flow_id(raw_id), raw_id)
        self._record_history(flow)  # read-repair: entries whose writer died are recorded now
        return flow

    def revisions(self, principal: Principal, raw_id: Any, page_number: int, page_size: int
                  ) -> tuple[list[dict], dict[str, Any]]:
        """One page of a flow's history, newest revision first, bounded as GET /flows is
        (``page_size`` already clamped to MAX_PAGE_SIZE, the answer to MAX_LIST_BYTES)."""
        flow = self._visible_with_history(principal, raw_id)
        flow_id = flow["_id"]

        def public(entry: dict) -> dict:
            return public_entry(flow_id, entry, entry if entry["kind"] == DEFINITION else None)

        return self._bounded_page(
            lambda fits: self._store.history.page(flow_id, page_number, page_size, fits=fits),
            public, page_number, page_size)

    def revision(self, principal: Principal, raw_id: Any, revision: int) -> dict[str, Any]:
        """One revision: its entry and the flow as it stood then (the definition in force)."""
        flow = self._visible_with_history(principal, raw_id)
        entry = self._store.history.get(flow["_id"], revision)
        if entry is None:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        definition = (entry if entry["kind"] == DEFINITION
                      else self._store.history.definition_at(flow["_id"], revision))
        return public_entry(flow["_id"], entry, definition)

    def diff(self, principal: Principal, raw_id: Any, source: int, target: int | None
             ) -> dict[str, Any]:
        """An RFC 6902 JSON Patch that turns revision ``source`` into ``target`` (or now)."""
        flow = self._visible_with_history(principal, raw_id)
        before = self._definition(raw_id, flow, source)
        after = definition_of(flow) if target is None else self._definition(raw_id, flow, target)
        patch = jsonpatch.make_patch(before, after).patch
        return {"from": source, "to": flow["revision"] if target is None else target,
                "patch": patch}

    def restore(self, principal: Principal, raw_id: Any, revision: Any,
                if_match: tuple[int, ...] | None = None, *, token: str | None = None
                ) -> Saved:
        """Make the definition of ``revision`` current again, as a new revision.

        The checks and the write are those of a PATCH (inactive flow, If-Match, validation,
        references); owners stay as they are now, so a restore never locks anyone out.
        """
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
            raise InvalidFlow(f"revision: must be a positive integer "
                              f"(got {domain.describe(revision)})")
        flow = self._visible_with_history(principal, raw_id)
        old = self._definition(raw_id, flow, revision)
        body = {key: old.get(key) for key in EDITABLE_FIELDS if key != "owners"}
        return self.update(principal, raw_id, body, if_match, token=token,
                           change="restored", restored_from=revision)

    def _definition(self, raw_id: Any, flow: Mapping[str, Any], revision: int) -> dict:
        if revision > flow["revision"]:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        entry = self._store.history.definition_at(flow["_id"], revision)
        if entry is None:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        return entry["flow"]

    @staticmethod
    def _not_kept(raw_id: Any, revision: int, flow: Mapping[str, Any]) -> str:
        return (f"revision {revision} of flow {raw_id} is not kept (the flow is at revision "
                f"{flow['revision']})")
