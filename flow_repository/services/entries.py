"""History entries: what a change records about itself, and how clients see an entry.

Pure functions of the change; :mod:`.recorder` moves the entries into the history.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from flow_repository.adapters.store import utcnow
from flow_repository.contract import EDITABLE_FIELDS
from flow_repository.domain import flow as domain
from flow_repository.domain import trace
from flow_repository.domain.flow import iso

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
    """A pending entry; it records the trace id of the change when it was made in a trace."""
    # not secret, only unique among a flow's pending entries; secrets' system call per
    # entry cost a status report 6 % of its time (random reseeds in a forked child)
    entry = {"entryId": f"{random.getrandbits(128):032x}", "kind": kind, "change": change,
             "sub": sub, "at": at, **fields}
    context = trace.current()
    if context is not None:
        entry["traceId"] = context.trace_id
    return entry


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
    return f"deleted-{secrets.token_hex(8)}"


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
    if "traceId" in entry:
        result["traceId"] = entry["traceId"]
    if flow is not None:
        result["flow"] = {"id": str(flow_id), **flow["flow"], "revision": flow["revision"]}
    return result
