"""History use cases: listing, reading, diffing and restoring a flow's revisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import Store
from flow_repository.contract import EDITABLE_FIELDS
from flow_repository.domain import flow as domain
from flow_repository.domain.flow import FlowNotFound, InvalidFlow

from .access import FlowAccess
from .entries import DEFINITION, definition_of, public_entry
from .flows import FlowUseCases
from .listing import Page, bounded_page
from .parsing import parse_flow_id
from .recorder import HistoryRecorder
from .results import Saved


@dataclass(frozen=True, kw_only=True)
class HistoryUseCases:
    """What a client reads of a flow's history, and restoring an earlier revision (which
    is an update of the flow, made through ``flows``)."""

    store: Store
    access: FlowAccess
    recorder: HistoryRecorder
    flows: FlowUseCases
    max_list_bytes: int = 4 * 1024 * 1024

    def _visible_with_history(self, principal: Principal, raw_id: Any) -> dict[str, Any]:
        flow = self.access.visible(principal, parse_flow_id(raw_id), raw_id)
        self.recorder.record(flow)  # read-repair: entries whose writer died are recorded now
        return flow

    def revisions(self, principal: Principal, raw_id: Any, page_number: int, page_size: int
                  ) -> Page:
        """One page of a flow's history, newest revision first, bounded as GET /flows is
        (``page_size`` already clamped to MAX_PAGE_SIZE, the answer to MAX_LIST_BYTES)."""
        flow = self._visible_with_history(principal, raw_id)
        flow_id = flow["_id"]

        def public(entry: dict) -> dict:
            return public_entry(flow_id, entry, entry if entry["kind"] == DEFINITION else None)

        return bounded_page(
            lambda fits: self.store.history.page(flow_id, page_number, page_size, fits=fits),
            public, page_number, page_size, self.max_list_bytes)

    def revision(self, principal: Principal, raw_id: Any, revision: int) -> dict[str, Any]:
        """One revision: its entry and the flow as it stood then (the definition in force)."""
        flow = self._visible_with_history(principal, raw_id)
        entry = self.store.history.get(flow["_id"], revision)
        if entry is None:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        definition = (entry if entry["kind"] == DEFINITION
                      else self.store.history.definition_at(flow["_id"], revision))
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
        return self.flows.update(principal, raw_id, body, if_match, token=token,
                           change="restored", restored_from=revision)

    def _definition(self, raw_id: Any, flow: Mapping[str, Any], revision: int) -> dict:
        if revision > flow["revision"]:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        entry = self.store.history.definition_at(flow["_id"], revision)
        if entry is None:
            raise FlowNotFound(self._not_kept(raw_id, revision, flow))
        return entry["flow"]

    @staticmethod
    def _not_kept(raw_id: Any, revision: int, flow: Mapping[str, Any]) -> str:
        return (f"revision {revision} of flow {raw_id} is not kept (the flow is at revision "
                f"{flow['revision']})")
