"""Flow use cases: read, list, create, update and delete flows, alone or in bulk."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from bson import ObjectId

from .. import domain
from ..auth import Principal
from ..domain import (
    FlowNotFound,
    InvalidFlow,
    ListQuery,
    describe,
    public_flow,
)
from ..schemas import EDITABLE_FIELDS, validate_flow
from ..step_logs import StepLogs, StepLogsNotConfigured
from ..store import utcnow
from .common import ItemResult, Saved, UseCases, parse_flow_id

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5



class FlowUseCases(UseCases):
    """Definition changes: what a client reads and writes about a flow."""

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

    def create(self, principal: Principal, body: Any) -> Saved:
        """Store a new, inactive flow; unknown fields of the body are dropped and named."""
        clean, ignored = validate_flow(body)
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
        return self._saved(flow, ignored)

    def create_many(self, principal: Principal, bodies: Sequence[Any]) -> list[ItemResult]:
        return self._each(bodies, 201, lambda body: self.create(principal, body))

    def update(
        self, principal: Principal, raw_id: Any, body: Any,
        if_match: tuple[int, ...] | None = None,
    ) -> Saved:
        """Apply a partial update to an inactive flow; the merged flow must be valid.

        A ``status`` in the body must be the flow's own (clients PATCH back what they
        read); unknown fields are dropped and named.
        """
        flow_id = parse_flow_id(raw_id)
        patch, ignored = validate_flow(body, partial=True, status=None)
        for _ in range(CAS_ATTEMPTS):
            current = self._visible(principal, flow_id, raw_id)
            self._require_inactive(current, "updated")
            self._require_revision(current, if_match)
            merged = {key: current[key] for key in EDITABLE_FIELDS if key in current}
            merged.update(body)
            validate_flow(merged, status=current["status"])
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
                return self._saved(updated, ignored)
        raise domain.Conflict(f"flow {raw_id} keeps changing; retry the update")

    @staticmethod
    def _saved(flow: dict[str, Any], ignored: list[str]) -> Saved:
        if ignored:
            # The caller learns it from meta.ignoredFields; the log keeps it for operators.
            log.info("unknown fields dropped", extra={"flowId": str(flow["_id"]),
                                                      "ignoredFields": ignored})
        return Saved(public_flow(flow), tuple(ignored))

    def update_many(self, principal: Principal, items: Sequence[Any]) -> list[ItemResult]:
        def update_item(item: Any) -> dict[str, Any]:
            if not isinstance(item, Mapping):
                raise InvalidFlow(f"each item must be a JSON object (got {describe(item)})")
            body = {key: value for key, value in item.items() if key != "id"}
            return self.update(principal, item.get("id"), body)

        return self._each(items, 200, update_item)

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


    def step_logs(self, principal: Principal, raw_id: Any, step_id: str, query: str) -> StepLogs:
        """The logs of one step of a flow the caller may see, from OIH's logging service."""
        flow_id = parse_flow_id(raw_id)
        self._visible(principal, flow_id, raw_id)
        if step_id in (".", ".."):  # would name another path of the logging service
            raise InvalidFlow(f"invalid step id {describe(step_id)}")
        if self._step_logs is None:
            raise StepLogsNotConfigured("step logs are not available: this installation "
                                        "has no logging service (LOGGING_SERVICE_BASE_URL)")
        return self._step_logs.fetch(str(flow_id), step_id, query)
