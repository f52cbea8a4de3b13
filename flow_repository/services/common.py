"""What every use case shares: results of bulk items, id and If-Match parsing, scope checks."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.outbox import pending_event
from flow_repository.adapters.references import ReferenceChecker, ReferencesUnavailable
from flow_repository.adapters.step_logs import StepLogClient
from flow_repository.adapters.store import Lease, Store
from flow_repository.adapters.store.base import Fits
from flow_repository.domain import flow as domain
from flow_repository.domain import ownership, paging
from flow_repository.domain.flow import (
    FlowError,
    FlowNotFound,
    Forbidden,
    InvalidFlow,
    describe,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class InvalidEvent(ValueError):
    """A broker message the service can never apply (dead-lettered, not retried)."""



@dataclass(frozen=True)
class Saved:
    """A flow as written, and the unknown fields that were dropped from the request."""

    flow: dict[str, Any]
    ignored_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item of a bulk request: what it wrote, or why it failed."""

    status: int
    index: int
    data: Mapping[str, Any] | None = None
    errors: Sequence[str] = ()
    ignored_fields: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        return self.status < 300



@dataclass
class Checks:
    """Runs the checks of a change. A real change stops at the first refusal (it raises);
    a dry run (``dry_run=True``) runs them all and collects every refusal as a problem,
    with the status the real call would answer, and unreachable services as warnings."""

    dry_run: bool = False
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def run(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``check(*args, **kwargs)``; in a dry run, None when it refused."""
        if not self.dry_run:
            return check(*args, **kwargs)
        try:
            return check(*args, **kwargs)
        except ReferencesUnavailable as error:
            self.warnings.extend(error.messages())
        except FlowError as error:
            self.problems.extend({"message": message, "code": error.status}
                                 for message in error.messages())
        return None


@dataclass(frozen=True)
class DryRun:
    """What a dry run found: the flow as it would be stored (None when it is not valid)."""

    flow: Mapping[str, Any] | None
    problems: Sequence[Mapping[str, Any]]
    warnings: Sequence[str]
    ignored_fields: Sequence[str] = ()

    def meta(self) -> dict[str, Any]:
        return {"dryRun": True, "valid": not self.problems, "problems": list(self.problems),
                "warnings": list(self.warnings), "ignoredFields": list(self.ignored_fields)}


def parse_flow_id(raw: Any) -> ObjectId:
    """The ObjectId a client or an event names; InvalidFlow (400) when it is malformed."""
    if not domain.is_object_id(raw):
        raise InvalidFlow(f"invalid flow id {describe(raw)}: expected 24 hexadecimal digits")
    return ObjectId(raw)



REVISION_TAG = re.compile(r'"([^"]*)"')  # the number inside goes through parse_number


def parse_if_match(header: str | None) -> tuple[int, ...] | None:
    """The revisions an If-Match header accepts; None when absent or ``*``.

    Only ``*`` or a list of strong entity tags holding a revision number (``"3"``) can
    match. Strong comparison, as RFC 9110 requires for If-Match: weak tags (``W/"3"``),
    unquoted or non-ASCII digits and anything else match nothing, so a header holding only
    those fails with 412 (never 500).
    """
    if header is None or header.strip() == "*":
        return None
    revisions = []
    for tag in header.split(","):
        matched = REVISION_TAG.fullmatch(tag.strip())
        if matched:
            try:
                revisions.append(domain.parse_number(matched.group(1), "If-Match"))
            except InvalidFlow:
                continue  # a tag that is no revision number matches nothing
    if not revisions:
        raise domain.PreconditionFailed(f"If-Match {describe(header)} names no revision "
                                        "of this flow")
    return tuple(revisions)



class RelayLink(Protocol):
    """What a use case needs of this process's outbox relay."""

    def lease(self) -> Lease: ...

    def hand_off(self, flow: Mapping[str, Any], lease: Lease | None) -> None: ...


class UseCases:
    """The store, settings and helpers that the flow and lifecycle use cases share."""

    def __init__(
        self,
        store: Store,
        *,
        timeouts: domain.Timeouts,
        bulk_max_items: int = 100,
        history_max_revisions: int = 100,
        references: ReferenceChecker | None = None,
        relay: RelayLink | None = None,
        step_logs: StepLogClient | None = None,
        ownership_policy: str = ownership.STRICT,
        max_list_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._store = store
        self._ownership_policy = ownership_policy
        self._max_list_bytes = max_list_bytes
        self._timeouts = timeouts
        self._bulk_max_items = bulk_max_items
        self._step_logs = step_logs  # None when no logging service is configured
        self._history_max_revisions = history_max_revisions  # 0 keeps every revision
        self._references = references
        self._relay = relay  # this process's outbox relay, when it runs one

    def _bounded_page(self, read: Callable[[Fits], tuple[list[dict], int]],
                      public: Callable[[dict], dict], page_number: int, page_size: int
                      ) -> tuple[list[dict], dict[str, Any]]:
        """One page of any list, read no further than MAX_LIST_BYTES of answer.

        ``read(fits)`` is the store call; ``fits`` turns each stored document into its public
        form as it is read, keeps it and measures it, and stops the read once the budget is
        spent, so the page is never held whole before it is cut (paging.page_size_within).
        """
        kept: list[dict] = []
        sizes: list[int] = []

        def fits(document: dict) -> bool:
            item = public(document)
            kept.append(item)
            sizes.append(len(json.dumps(item, default=str)))
            return len(sizes) == 1 or sum(sizes) <= self._max_list_bytes

        _, total = read(fits)
        offset = (page_number - 1) * page_size
        size = paging.page_size_within(sizes, offset, page_size, self._max_list_bytes)
        return kept[:size], paging.page_meta(total, offset, size, page_size)

    def _each(
        self,
        items: Sequence[Any],
        success: int,
        apply: Callable[[Any], Mapping[str, Any] | Saved],
    ) -> list[ItemResult]:
        """Apply a use case to every item of a bulk request; one failure stops no other."""
        self._check_bulk_size(items)
        results = []
        for index, item in enumerate(items):
            try:
                outcome = apply(item)
                saved = outcome if isinstance(outcome, Saved) else Saved(dict(outcome))
                results.append(ItemResult(success, index, saved.flow,
                                          ignored_fields=saved.ignored_fields))
            except FlowError as error:
                results.append(ItemResult(error.status, index, errors=error.messages()))
        return results

    @staticmethod
    def _scope(principal: Principal) -> tuple[str, ...] | None:
        return None if principal.is_admin else principal.owner_ids

    def _visible(self, principal: Principal, flow_id: ObjectId, raw_id: Any) -> dict[str, Any]:
        flow = self._store.get(flow_id, self._scope(principal))
        if flow is None:
            raise FlowNotFound(f"flow {raw_id} not found")
        return flow

    def _check_owners(self, principal: Principal, requested: Sequence[Mapping[str, Any]],
                      stored: Sequence[Mapping[str, Any]]) -> None:
        """403 naming each owner entry the caller may not add or remove."""
        problems = ownership.owner_change_problems(
            requested, stored, sub=principal.sub, tenant=principal.tenant,
            is_admin=principal.is_admin, policy=self._ownership_policy)
        if problems:
            raise Forbidden("these owners may not be set by this caller", problems)

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

    def _lease(self) -> Lease | None:
        """The relay lease a write takes along (None when this process runs no relay)."""
        return None if self._relay is None else self._relay.lease()

    @staticmethod
    def _change_event(name: str, principal: Principal, flow_id: ObjectId,
                      revision: int | None = None) -> dict[str, Any]:
        return pending_event(
            name, {"tenant": principal.tenant, "user": principal.sub, "flowId": str(flow_id)},
            revision=revision,
        )

