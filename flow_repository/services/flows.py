"""Flow use cases: read, list, create, update and delete flows, alone or in bulk."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.outbox import pending_event
from flow_repository.adapters.references import ReferenceChecker
from flow_repository.adapters.step_logs import StepLogClient, StepLogs, StepLogsNotConfigured
from flow_repository.adapters.store import Store, utcnow
from flow_repository.contract import EDITABLE_FIELDS
from flow_repository.contract.schemas import validate_flow
from flow_repository.domain import flow as domain
from flow_repository.domain.flow import (
    FlowNotFound,
    InvalidFlow,
    ListQuery,
    describe,
    public_flow,
)

from .access import FlowAccess, require_inactive, require_revision, scope
from .bulk import each
from .entries import definition_entry, deleted_entry
from .listing import Page, bounded_page, public_text
from .parsing import parse_flow_id
from .recorder import HistoryRecorder
from .results import Checks, DryRun, ItemResult, Saved, Shown

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5


def change_event(name: str, principal: Principal, flow_id: ObjectId,
                 revision: int | None = None) -> dict[str, Any]:
    """The outbox entry of a definition change: OIH's ``{tenant, user, flowId}`` payload."""
    return pending_event(
        name, {"tenant": principal.tenant, "user": principal.sub, "flowId": str(flow_id)},
        revision=revision,
    )


@dataclass(frozen=True, kw_only=True)
class FlowUseCases:
    """Definition changes: what a client reads and writes about a flow."""

    store: Store
    access: FlowAccess
    recorder: HistoryRecorder
    bulk_max_items: int = 100
    max_list_bytes: int = 4 * 1024 * 1024
    references: ReferenceChecker | None = None
    step_log_client: StepLogClient | None = None  # None: no logging service configured

    def get(self, principal: Principal, raw_id: Any) -> Shown:
        flow = self.store.get(parse_flow_id(raw_id), scope(principal), shared=True)
        if flow is None:
            raise FlowNotFound(f"flow {raw_id} not found")
        return Shown(flow["revision"], public_text(flow, public_flow))

    def list(self, principal: Principal, query: ListQuery) -> Page:
        owners = scope(principal)
        return bounded_page(lambda fits: self.store.list(query, owners, fits=fits),
                            public_flow, query.page_number, query.page_size,
                            self.max_list_bytes)

    def create(self, principal: Principal, body: Any, *, token: str | None = None) -> Saved:
        """Store a new, inactive flow; unknown fields of the body are dropped and named."""
        document, ignored = self._new_flow(principal, body, token, Checks())
        lease = self.recorder.lease(document["outbox"])
        if lease is not None:  # a new flow: no relay can hold it yet
            document["relayLeaseOwner"], document["relayLeaseUntil"] = lease
        flow = self.store.insert(document)
        self.recorder.after_write(flow, lease)
        log.info("flow created", extra={"flowId": str(flow["_id"])})
        return self._saved(public_flow(flow), ignored)

    def create_dry_run(self, principal: Principal, body: Any, *, token: str | None = None
                       ) -> DryRun:
        """Every check of :meth:`create`; nothing is written and no event is queued."""
        checks = Checks(dry_run=True)
        document, ignored = self._new_flow(principal, body, token, checks)
        return DryRun(None if document is None else public_flow(document),
                      checks.problems, checks.warnings, tuple(ignored))

    def _new_flow(self, principal: Principal, body: Any, token: str | None, checks: Checks
                  ) -> tuple[dict[str, Any] | None, list[str]]:
        """The document a create would store (None when a dry run found it invalid), and
        the unknown fields dropped from the body."""
        validated = checks.run(validate_flow, body)
        if validated is None:
            return None, []
        clean, ignored = validated
        checks.run(self.access.check_owners, principal, clean.get("owners") or [], [])
        checks.run(self._check_references, token, clean)
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
            "outbox": [change_event("flowrepo.flow.created", principal, flow_id, 1)],
        }
        document["historyOutbox"] = [definition_entry(principal.sub, "created", document)]
        return document, ignored

    def create_many(self, principal: Principal, bodies: Sequence[Any], *,
                    token: str | None = None) -> list[ItemResult]:
        return each(bodies, 201, lambda body: self.create(principal, body, token=token),
                    self.bulk_max_items)

    def update(
        self, principal: Principal, raw_id: Any, body: Any,
        if_match: tuple[int, ...] | None = None, *, token: str | None = None,
        change: str = "updated", restored_from: int | None = None,
    ) -> Saved:
        """Apply a partial update to an inactive flow; the merged flow must be valid.

        A ``status`` in the body must be the flow's own (clients PATCH back what they
        read); unknown fields are dropped and named.
        """
        flow, ignored = self._change(principal, raw_id, body, if_match, token, Checks(),
                                     change=change, restored_from=restored_from)
        # Only a dry run gets no flow back: a real change raises at its first refusal.
        return self._saved(cast(dict[str, Any], flow), ignored)

    def update_dry_run(
        self, principal: Principal, raw_id: Any, body: Any,
        if_match: tuple[int, ...] | None = None, *, token: str | None = None,
    ) -> DryRun:
        """Every check of :meth:`update`; nothing is written and no event is queued."""
        checks = Checks(dry_run=True)
        flow, ignored = self._change(principal, raw_id, body, if_match, token, checks)
        return DryRun(flow, checks.problems, checks.warnings, tuple(ignored))

    def _change(
        self, principal: Principal, raw_id: Any, body: Any,
        if_match: tuple[int, ...] | None, token: str | None, checks: Checks,
        *, change: str = "updated", restored_from: int | None = None,
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """Check and (unless a dry run) apply a change: the flow as it is or would be
        stored (None when a dry run found the body invalid), and the dropped fields."""
        flow_id = parse_flow_id(raw_id)
        validated = checks.run(validate_flow, body, partial=True, status=None)
        for _ in range(CAS_ATTEMPTS):
            current = self.access.visible(principal, flow_id, raw_id)
            checks.run(require_inactive, current, "updated")
            checks.run(require_revision, current, if_match)
            if validated is None:
                return None, []  # a dry run of an invalid body: there is no flow to show
            patch, ignored = validated
            if "owners" in patch:
                checks.run(self.access.check_owners, principal, patch["owners"],
                           current.get("owners", []))
            merged = {key: current[key] for key in EDITABLE_FIELDS if key in current}
            merged.update(body)
            merged_validated = checks.run(validate_flow, merged, status=current["status"])
            if merged_validated is None:
                return None, ignored
            checks.run(self._check_references, token, merged_validated[0])
            # the write below applies only at this revision, so it makes the next one
            events = [change_event("flowrepo.flow.modified", principal, flow_id,
                                         current["revision"] + 1)]
            changes = {**patch, "updatedAt": utcnow()}
            changes["owners"] = domain.with_owner(
                patch.get("owners", current.get("owners", [])), principal.sub, "user"
            )
            extra = {} if restored_from is None else {"restoredFrom": restored_from}
            entry = definition_entry(principal.sub, change, {**current, **changes}, **extra)
            if checks.dry_run:
                return public_flow({**current, **changes,
                                    "revision": current["revision"] + 1}), ignored
            updated = self.store.update(
                flow_id,
                owner_ids=scope(principal),
                statuses=(domain.INACTIVE,),
                revision=current["revision"],
                changes=changes,
                events=events,
                history=entry,
                lease=(lease := self.recorder.lease(events)),
            )
            if updated is not None:
                self.recorder.after_write(updated, lease)
                return public_flow(updated), ignored
        raise domain.Conflict(f"flow {raw_id} keeps changing; retry the update")

    @staticmethod
    def _saved(flow: dict[str, Any], ignored: list[str]) -> Saved:
        """A flow as written (public form), and the fields dropped from the request."""
        if ignored:
            # The caller learns it from meta.ignoredFields; the log keeps it for operators.
            log.info("unknown fields dropped", extra={"flowId": flow["id"],
                                                      "ignoredFields": ignored})
        return Saved(flow, tuple(ignored))

    def _check_references(self, token: str | None, flow: Mapping[str, Any]) -> None:
        if self.references is not None:
            self.references.check(token, flow)

    def update_many(self, principal: Principal, items: Sequence[Any], *,
                    token: str | None = None) -> list[ItemResult]:
        def update_item(item: Any) -> Saved:
            if not isinstance(item, Mapping):
                raise InvalidFlow(f"each item must be a JSON object (got {describe(item)})")
            body = {key: value for key, value in item.items() if key != "id"}
            return self.update(principal, item.get("id"), body, token=token)

        return each(items, 200, update_item, self.bulk_max_items)

    def delete(
        self, principal: Principal, raw_id: Any, if_match: tuple[int, ...] | None = None
    ) -> None:
        """Delete an inactive flow; flowrepo.flow.deleted still goes out after it is gone."""
        flow_id = parse_flow_id(raw_id)
        events = [change_event("flowrepo.flow.deleted", principal, flow_id)]
        deleted = self.store.update(
            flow_id,
            owner_ids=scope(principal),
            statuses=(domain.INACTIVE,),
            revision=if_match,
            changes={"deletedAt": utcnow()},
            events=events,
            history=deleted_entry(principal.sub),
            lease=(lease := self.recorder.lease(events)),
        )
        if deleted is None:
            current = self.access.visible(principal, flow_id, raw_id)
            require_inactive(current, "deleted")
            require_revision(current, if_match)
            raise domain.Conflict(f"flow {raw_id} changed while it was being deleted; retry")
        self.recorder.after_write(deleted, lease)

    def step_logs(self, principal: Principal, raw_id: Any, step_id: str, query: str) -> StepLogs:
        """The logs of one step of a flow the caller may see, from OIH's logging service."""
        flow_id = parse_flow_id(raw_id)
        self.access.visible(principal, flow_id, raw_id)
        if step_id in (".", ".."):  # would name another path of the logging service
            raise InvalidFlow(f"invalid step id {describe(step_id)}")
        if self.step_log_client is None:
            raise StepLogsNotConfigured("step logs are not available: this installation "
                                        "has no logging service (LOGGING_SERVICE_BASE_URL)")
        return self.step_log_client.fetch(str(flow_id), step_id, query)
