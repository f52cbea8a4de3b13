"""Who sees which flows, and the preconditions a change of one must meet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import Store
from flow_repository.domain import flow as domain
from flow_repository.domain import ownership
from flow_repository.domain.flow import FlowNotFound, Forbidden


def scope(principal: Principal) -> tuple[str, ...] | None:
    """The owner ids whose flows ``principal`` sees (None: every flow, for an admin)."""
    return None if principal.is_admin else principal.owner_ids


def require_inactive(flow: Mapping[str, Any], action: str) -> None:
    if flow["status"] != domain.INACTIVE:
        raise domain.Conflict(
            f"flow {flow['_id']} cannot be {action} while its status is {flow['status']}; "
            f"only an inactive flow can be {action}"
        )


def require_revision(flow: Mapping[str, Any], if_match: tuple[int, ...] | None) -> None:
    if if_match is not None and flow["revision"] not in if_match:
        expected = " or ".join(str(revision) for revision in if_match)
        raise domain.PreconditionFailed(
            f"flow {flow['_id']} is at revision {flow['revision']}, not {expected}"
        )


class FlowAccess:
    """The flows a caller may see in the store, and the owners a caller may set."""

    def __init__(self, store: Store, ownership_policy: str = ownership.STRICT) -> None:
        self._store = store
        self._ownership_policy = ownership_policy

    def visible(self, principal: Principal, flow_id: ObjectId, raw_id: Any) -> dict[str, Any]:
        """The stored flow, if ``principal`` may see it; FlowNotFound (404) otherwise."""
        flow = self._store.get(flow_id, scope(principal))
        if flow is None:
            raise FlowNotFound(f"flow {raw_id} not found")
        return flow

    def check_owners(self, principal: Principal, requested: Sequence[Mapping[str, Any]],
                     stored: Sequence[Mapping[str, Any]]) -> None:
        """403 naming each owner entry the caller may not add or remove."""
        problems = ownership.owner_change_problems(
            requested, stored, sub=principal.sub, tenant=principal.tenant,
            is_admin=principal.is_admin, policy=self._ownership_policy)
        if problems:
            raise Forbidden("these owners may not be set by this caller", problems)
