"""Use cases shared by the API and the worker: write, list, start, stop, apply events, reconcile."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bson import ObjectId

from . import domain
from .auth import Principal
from .domain import (
    FlowError,
    FlowNotFound,
    InvalidFlow,
    ListQuery,
    Transition,
    describe,
    public_flow,
)
from .events import pending_event
from .schemas import EDITABLE_FIELDS, validate_flow
from .store import FlowStore, utcnow

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5


class InvalidEvent(ValueError):
    """A broker message the service can never apply (dead-lettered, not retried)."""


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item of a bulk request."""

    status: int
    index: int
    id: str | None = None
    data: Mapping[str, Any] | None = None
    errors: Sequence[str] = ()

    def body(self) -> dict[str, Any]:
        result: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.id is not None:
            result["id"] = self.id
        if self.data is not None:
            result["data"] = self.data
        if self.errors:
            result["errors"] = [{"message": m, "code": self.status} for m in self.errors]
        return result


def parse_flow_id(raw: Any) -> ObjectId:
    """The ObjectId a client or an event names; InvalidFlow (400) when it is malformed."""
    if not domain.is_object_id(raw):
        raise InvalidFlow(f"invalid flow id {describe(raw)}: expected 24 hexadecimal digits")
    return ObjectId(raw)


def parse_if_match(header: str | None) -> tuple[int, ...] | None:
    """The revisions an If-Match header accepts; None when absent or ``*``.

    Strong comparison, as RFC 9110 requires for If-Match: weak tags (``W/"3"``) and tags
    that name no revision match nothing, so a header holding only those fails with 412.
    """
    if header is None or header.strip() == "*":
        return None
    revisions = []
    for tag in header.split(","):
        tag = tag.strip()
        if len(tag) > 2 and tag[0] == tag[-1] == '"':
            tag = tag[1:-1]
        if tag.isdigit():  # a bare revision number is accepted too, for scripts
            revisions.append(int(tag))
    if not revisions:
        raise domain.PreconditionFailed(f"If-Match {describe(header)} names no revision "
                                        "of this flow")
    return tuple(revisions)


class FlowService:
    """Every rule about flows, reached by the API routes and by the worker alike."""

    def __init__(
        self,
        store: FlowStore,
        *,
        timeouts: domain.Timeouts,
        bulk_max_items: int = 100,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._timeouts = timeouts
        self._bulk_max_items = bulk_max_items
        self._notify = notify  # wakes the outbox relay after a write that queued events

    # ------------------------------------------------------------------------- reads

    def get(self, principal: Principal, raw_id: Any) -> dict[str, Any]:
        flow = self._store.get(parse_flow_id(raw_id), self._scope(principal))
        if flow is None:
            raise FlowNotFound(f"flow {raw_id} not found")
        return public_flow(flow)

    def list(self, principal: Principal, query: ListQuery) -> tuple[list[dict], dict[str, int]]:
        flows, total = self._store.list(query, self._scope(principal))
        meta = {
            "total": total,
            "page": query.page_number,
            "perPage": query.page_size,
            "totalPages": math.ceil(total / query.page_size),
        }
        return [public_flow(flow) for flow in flows], meta

    # ------------------------------------------------------------------------- writes

    def create(self, principal: Principal, body: Any) -> dict[str, Any]:
        clean = validate_flow(body)
        flow_id = ObjectId()
        now = utcnow()
        owners = domain.with_owner(clean.get("owners") or [], principal.sub, "user")
        if principal.tenant:
            owners = domain.with_owner(owners, principal.tenant, "tenant")
        document = {
            **{key: value for key, value in clean.items() if key != "owners"},
            "_id": flow_id,
            "type": clean.get("type") or "ordinary",
            "owners": owners,
            "tenant": principal.tenant,
            "status": domain.INACTIVE,
            "createdAt": now,
            "updatedAt": now,
            "revision": 1,
            "statusChangedAt": now,
            "statusReason": "created",
            "statusRetries": 0,
            "outbox": [self._change_event("flowrepo.flow.created", principal, flow_id)],
        }
        flow = self._store.insert(document)
        self._notify()
        log.info("flow created", extra={"flowId": str(flow_id)})
        return public_flow(flow)

    def create_many(self, principal: Principal, bodies: Sequence[Any]) -> list[ItemResult]:
        return self._each(bodies, 201, lambda body: self.create(principal, body),
                          id_of=lambda body: None)

    def update(
        self, principal: Principal, raw_id: Any, body: Any,
        if_match: tuple[int, ...] | None = None,
    ) -> dict[str, Any]:
        """Apply a partial update to an inactive flow; the merged flow must be valid."""
        flow_id = parse_flow_id(raw_id)
        patch = validate_flow(body, partial=True)
        for _ in range(CAS_ATTEMPTS):
            current = self._visible(principal, flow_id, raw_id)
            self._require_inactive(current, "updated")
            self._require_revision(current, if_match)
            merged = {key: current[key] for key in EDITABLE_FIELDS if key in current}
            merged.update(body)
            validate_flow(merged)
            changes = dict(patch)
            changes["owners"] = domain.with_owner(
                patch.get("owners", current.get("owners", [])), principal.sub, "user"
            )
            updated = self._store.update(
                flow_id,
                owner_ids=self._scope(principal),
                statuses=(domain.INACTIVE,),
                revision=current["revision"],
                changes=changes,
                events=[self._change_event("flowrepo.flow.modified", principal, flow_id)],
            )
            if updated is not None:
                self._notify()
                return public_flow(updated)
        raise domain.Conflict(f"flow {raw_id} keeps changing; retry the update")

    def update_many(self, principal: Principal, items: Sequence[Any]) -> list[ItemResult]:
        def update_item(item: Any) -> dict[str, Any]:
            if not isinstance(item, Mapping):
                raise InvalidFlow(f"each item must be a JSON object (got {describe(item)})")
            body = {key: value for key, value in item.items() if key != "id"}
            return self.update(principal, item.get("id"), body)

        return self._each(items, 200, update_item,
                          id_of=lambda item: item.get("id") if isinstance(item, Mapping) else None)

    def delete(
        self, principal: Principal, raw_id: Any, if_match: tuple[int, ...] | None = None
    ) -> None:
        """Delete an inactive flow; flowrepo.flow.deleted still goes out after it is gone."""
        flow_id = parse_flow_id(raw_id)
        deleted = self._store.update(
            flow_id,
            owner_ids=self._scope(principal),
            statuses=(domain.INACTIVE,),
            revision=if_match,
            changes={"deletedAt": utcnow()},
            events=[self._change_event("flowrepo.flow.deleted", principal, flow_id)],
        )
        if deleted is None:
            current = self._visible(principal, flow_id, raw_id)
            self._require_inactive(current, "deleted")
            self._require_revision(current, if_match)
            raise domain.Conflict(f"flow {raw_id} changed while it was being deleted; retry")
        self._notify()

    # ------------------------------------------------------------------------- lifecycle

    def start(self, principal: Principal, raw_id: Any) -> dict[str, str]:
        changes, events = self._status_change(domain.START, startedBy=principal.sub)
        changes["startedBy"] = principal.sub
        return self._command(principal, raw_id, domain.START, changes, events)

    def stop(self, principal: Principal, raw_id: Any) -> dict[str, str]:
        changes, events = self._status_change(domain.STOP)
        return self._command(principal, raw_id, domain.STOP, changes, events)

    def start_many(self, principal: Principal, raw_ids: Sequence[Any]) -> list[ItemResult]:
        return self._each(raw_ids, 200, lambda raw_id: self.start(principal, raw_id))

    def stop_many(self, principal: Principal, raw_ids: Sequence[Any]) -> list[ItemResult]:
        return self._each(raw_ids, 200, lambda raw_id: self.stop(principal, raw_id))

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
        updated = self._store.update(
            flow_id, statuses=transition.sources, changes=changes, events=events
        )
        if updated is not None:
            self._notify_if(events)
            return f"{transition.name}: flow is now {updated['status']}"
        current = self._store.get(flow_id)
        if current is None:
            return f"{transition.name}: ignored, flow {flow_id} is unknown or deleted"
        return f"{transition.name}: ignored, flow is {current['status']}"

    def remove_owner(self, owner_id: Any) -> int:
        """Take a deleted user or tenant out of every flow; running orphans are stopped."""
        if not isinstance(owner_id, str) or not owner_id:
            raise InvalidEvent(f"an owner id must be a non-empty string (got {describe(owner_id)})")
        orphaned = domain.ORPHANED
        changed = 0
        for flow_id in self._store.owned_by(owner_id):
            changes, events = self._status_change(orphaned)
            stopped = self._store.update(
                flow_id,
                owner_ids=(owner_id,),
                owner_count=1,
                statuses=orphaned.sources,
                remove_owner=owner_id,
                changes=changes,
                events=events,
            )
            if stopped is not None:
                self._notify()
            else:
                self._store.update(flow_id, owner_ids=(owner_id,), remove_owner=owner_id)
            changed += 1
        return changed

    def reconcile(self) -> int:
        """Move flows whose orchestrator answer is overdue: re-send once, then give up."""
        moved = 0
        for status in (domain.STARTING, domain.STOPPING):
            for retries in (0, 1):
                transition, timeout = self._timeouts.plan(status, retries)
                overdue = utcnow() - timedelta(seconds=timeout)
                for flow in self._store.stuck(status, overdue, retries=retries):
                    moved += self._reconcile_one(flow, transition, retries)
        return moved

    # ------------------------------------------------------------------------- helpers

    def _reconcile_one(self, flow: Mapping[str, Any], transition: Transition, retries: int) -> int:
        extra = {"startedBy": flow.get("startedBy")} if transition.event == "flow.starting" else {}
        changes, events = self._status_change(transition, **extra)
        if transition.target == flow["status"]:
            changes["statusRetries"] = retries + 1
        updated = self._store.update(
            flow["_id"], statuses=(flow["status"],), revision=flow["revision"],
            changes=changes, events=events,
        )
        if updated is None:
            return 0
        log.warning("flow reconciled", extra={"flowId": str(flow["_id"]),
                                              "reason": transition.reason})
        self._notify_if(events)
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
        updated = self._store.update(
            flow_id,
            owner_ids=self._scope(principal),
            statuses=transition.sources,
            changes=changes,
            events=events,
        )
        if updated is None:
            current = self._visible(principal, flow_id, raw_id)
            raise domain.Conflict(
                f"cannot {transition.name} flow {raw_id}: its status is {current['status']}"
            )
        self._notify()
        return {"id": str(flow_id), "status": updated["status"]}

    def _each(
        self,
        items: Sequence[Any],
        success: int,
        apply: Callable[[Any], Mapping[str, Any]],
        id_of: Callable[[Any], Any] = lambda item: item,
    ) -> list[ItemResult]:
        """Apply a use case to every item of a bulk request; one failure stops no other."""
        self._check_bulk_size(items)
        results = []
        for index, item in enumerate(items):
            try:
                outcome = apply(item)
                results.append(ItemResult(success, index, outcome["id"], outcome))
            except FlowError as error:
                raw_id = id_of(item)
                results.append(ItemResult(error.status, index,
                                          raw_id if isinstance(raw_id, str) else None,
                                          errors=error.messages()))
        return results

    @staticmethod
    def _status_change(
        transition: Transition, **event_fields: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """What a transition writes, and the event it queues with the same status fields.

        The event carries the status, reason and time of this change, so a publish delayed
        by an outage still reports this change even if the flow has moved on since.
        """
        changes = {
            "status": transition.target,
            "statusChangedAt": utcnow(),
            "statusReason": transition.reason,
            "statusRetries": 0,
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

    @staticmethod
    def _scope(principal: Principal) -> tuple[str, ...] | None:
        return None if principal.is_admin else principal.owner_ids

    def _visible(self, principal: Principal, flow_id: ObjectId, raw_id: Any) -> dict[str, Any]:
        flow = self._store.get(flow_id, self._scope(principal))
        if flow is None:
            raise FlowNotFound(f"flow {raw_id} not found")
        return flow

    @staticmethod
    def _require_inactive(flow: Mapping[str, Any], action: str) -> None:
        if flow["status"] != domain.INACTIVE:
            raise domain.Conflict(
                f"flow {flow['_id']} cannot be {action} while its status is {flow['status']}; "
                f"only an inactive flow can be {action}"
            )

    @staticmethod
    def _require_revision(flow: Mapping[str, Any], if_match: tuple[int, ...] | None) -> None:
        if if_match is not None and flow["revision"] not in if_match:
            expected = " or ".join(str(revision) for revision in if_match)
            raise domain.PreconditionFailed(
                f"flow {flow['_id']} is at revision {flow['revision']}, not {expected}"
            )

    def _check_bulk_size(self, items: Sequence[Any]) -> None:
        if not items:
            raise InvalidFlow("the list of items is empty")
        if len(items) > self._bulk_max_items:
            raise InvalidFlow(f"at most {self._bulk_max_items} items per request "
                              f"(got {len(items)})")

    def _notify_if(self, events: Sequence[Any]) -> None:
        if events:
            self._notify()

    @staticmethod
    def _change_event(name: str, principal: Principal, flow_id: ObjectId) -> dict[str, Any]:
        return pending_event(
            name, {"tenant": principal.tenant, "user": principal.sub, "flowId": str(flow_id)}
        )


def _event_flow_id(payload: Any) -> ObjectId:
    raw = payload.get("id") if isinstance(payload, Mapping) else None
    if not domain.is_object_id(raw):
        raise InvalidEvent(f"event payload names no valid flow id (got {describe(raw)})")
    return ObjectId(raw)
