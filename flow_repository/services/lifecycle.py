"""Lifecycle use cases: start, stop, orchestrator and IAM events, and the reconciler."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.outbox import pending_event
from flow_repository.adapters.store import Store, utcnow
from flow_repository.domain import flow as domain
from flow_repository.domain.flow import (
    Transition,
    describe,
)

from .access import FlowAccess, scope
from .bulk import each
from .entries import owner_removed_entry, status_entry
from .parsing import parse_flow_id
from .recorder import HistoryRecorder
from .results import InvalidEvent, ItemResult

log = logging.getLogger(__name__)

# What applying an orchestrator report reads back: its log line, the history recorder and
# the change feed (owners, type and template: who may see the change, and the filters).
REPORT_FIELDS = ("status", "revision", "deletedAt", "historyOutbox", "owners", "type",
                 "fromTemplate")


@dataclass(frozen=True, kw_only=True)
class LifecycleUseCases:
    """Status changes: commands from clients, reports from the orchestrator and IAM,
    timeouts."""

    store: Store
    access: FlowAccess
    recorder: HistoryRecorder
    timeouts: domain.Timeouts
    bulk_max_items: int = 100

    def start(self, principal: Principal, raw_id: Any) -> dict[str, str]:
        changes, events = self._status_change(domain.START, startedBy=principal.sub)
        changes["startedBy"] = principal.sub
        return self._command(principal, raw_id, domain.START, changes, events)

    def stop(self, principal: Principal, raw_id: Any) -> dict[str, str]:
        changes, events = self._status_change(domain.STOP)
        return self._command(principal, raw_id, domain.STOP, changes, events)

    def start_many(self, principal: Principal, raw_ids: Sequence[Any]) -> list[ItemResult]:
        return each(raw_ids, 200, lambda raw_id: self.start(principal, raw_id),
                    self.bulk_max_items)

    def stop_many(self, principal: Principal, raw_ids: Sequence[Any]) -> list[ItemResult]:
        return each(raw_ids, 200, lambda raw_id: self.stop(principal, raw_id),
                    self.bulk_max_items)

    def apply_status_event(self, name: str, payload: Any) -> str:
        """Apply an orchestrator report (flow.started/stopped/failed); idempotent.

        Returns what happened, for the log. Reports that do not fit the flow's status (late,
        duplicate, for an unknown or deleted flow) change nothing.
        """
        transition = domain.STATUS_EVENTS.get(name)
        if transition is None:
            raise InvalidEvent(f"no handler for event {describe(name)}")
        flow_id = _event_flow_id(payload)
        changes, events = self._status_change(transition)
        updated = self._transit(flow_id, transition, changes, events, returning=REPORT_FIELDS)
        if updated is not None:
            return f"{transition.name}: flow is now {updated['status']}"
        current = self.store.get(flow_id)
        if current is None:
            return f"{transition.name}: ignored, flow {flow_id} is unknown or deleted"
        return f"{transition.name}: ignored, flow is {current['status']}"

    def remove_owner(self, owner_id: Any) -> int:
        """Take a deleted user or tenant out of every flow; running orphans are stopped."""
        if not isinstance(owner_id, str) or not owner_id:
            raise InvalidEvent(f"an owner id must be a non-empty string (got {describe(owner_id)})")
        orphaned = domain.ORPHANED
        changed = 0
        for flow_id in self.store.owned_by(owner_id):
            # History first: were the owner removed first, a crash in between would leave
            # the id in history with no flow left listing it for a redelivery to find.
            self.recorder.forget_owner(flow_id, owner_id)
            changes, events = self._status_change(orphaned)
            stopped = self._transit(flow_id, orphaned, changes, events, owner_ids=(owner_id,),
                                    owner_count=1, remove_owner=owner_id)
            if stopped is None:
                lease = self.recorder.lease(())
                removed = self.store.update(flow_id, owner_ids=(owner_id,),
                                             remove_owner=owner_id,
                                             history=owner_removed_entry(), lease=lease)
                if removed is not None:
                    self.recorder.after_write(removed, lease)
            changed += 1
        return changed

    def reconcile(self) -> int:
        """Move flows whose orchestrator answer is overdue: re-send once, then give up."""
        moved = 0
        for status in (domain.STARTING, domain.STOPPING):
            for retries in (0, 1):
                transition, timeout = self.timeouts.plan(status, retries)
                overdue = utcnow() - timedelta(seconds=timeout)
                for flow in self.store.stuck(status, overdue, retries=retries):
                    moved += self._reconcile_one(flow, transition, retries)
        return moved

    def _reconcile_one(self, flow: Mapping[str, Any], transition: Transition, retries: int) -> int:
        extra = {"startedBy": flow.get("startedBy")} if transition.event == "flow.starting" else {}
        changes, events = self._status_change(transition, **extra)
        if transition.target == flow["status"]:
            changes["statusRetries"] = retries + 1
        updated = self._transit(flow["_id"], transition, changes, events,
                                sources=(flow["status"],), revision=flow["revision"])
        if updated is None:
            return 0
        log.warning("flow reconciled", extra={"flowId": str(flow["_id"]),
                                              "reason": transition.reason})
        return 1

    def _command(
        self,
        principal: Principal,
        raw_id: Any,
        transition: Transition,
        changes: Mapping[str, Any],
        events: Sequence[Mapping[str, Any]],
    ) -> dict[str, str]:
        flow_id = parse_flow_id(raw_id)
        updated = self._transit(flow_id, transition, changes, events, sub=principal.sub,
                                owner_ids=scope(principal))
        if updated is None:
            current = self.access.visible(principal, flow_id, raw_id)
            raise domain.Conflict(
                f"cannot {transition.name} flow {raw_id}: its status is {current['status']}"
            )
        return {"id": str(flow_id), "status": updated["status"]}

    def _transit(
        self,
        flow_id: ObjectId,
        transition: Transition,
        changes: Mapping[str, Any],
        events: Sequence[Mapping[str, Any]],
        *,
        sub: str | None = None,
        sources: Sequence[str] | None = None,
        returning: Sequence[str] | None = None,
        **preconditions: Any,
    ) -> dict[str, Any] | None:
        """Apply a status change atomically; the flow after it, or None when refused.

        One attempt per allowed source status (the usual one first), so that the history
        entry written with the change knows the status it left. With a relay in this
        process the whole flow comes back when the relay has something to do with it: it
        renders the events from it, and records its history where the store leaves the
        entry pending in the flow.
        """
        lease = self.recorder.lease(events)  # given one, the relay needs the whole flow
        for source in sources or transition.sources:
            entry = status_entry(transition, source, changes["statusChangedAt"], sub)
            updated = self.store.update(flow_id, statuses=(source,), changes=changes,
                                         events=events, history=entry,
                                         returning=None if lease is not None else returning,
                                         lease=lease, **preconditions)
            if updated is not None:
                self.recorder.after_write(updated, lease)
                return updated
        return None

    @staticmethod
    def _status_change(
        transition: Transition, **event_fields: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """What a transition writes, and the event it queues with the same status fields.

        The event carries the status, reason and time of this change, so a publish delayed
        by an outage still reports this change even if the flow has moved on since.
        """
        now = utcnow()
        changes = {
            "status": transition.target,
            "statusChangedAt": now,
            "statusReason": transition.reason,
            "statusRetries": 0,
            "updatedAt": now,
        }
        if transition.event is None:
            return changes, []
        event = pending_event(
            transition.event,
            status=transition.target,
            statusReason=transition.reason,
            statusChangedAt=domain.iso(changes["statusChangedAt"]),
            **event_fields,
        )
        return changes, [event]


def _event_flow_id(payload: Any) -> ObjectId:
    raw = payload.get("id") if isinstance(payload, Mapping) else None
    if not domain.is_object_id(raw):
        raise InvalidEvent(f"event payload names no valid flow id (got {describe(raw)})")
    return ObjectId(raw)

