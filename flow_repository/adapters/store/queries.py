"""The MongoDB query shapes of the service and the indexes that serve them, in one place.

The MongoDB backend builds every steady-state query here, and the explain tests check these
very shapes against a real server, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo

from flow_repository.contract import SORT_FIELDS
from flow_repository.domain.flow import ListQuery

ASC = pymongo.ASCENDING
ID_INDEX = "_id_"
PENDING_KEY = "outbox.0.storedAt"  # the oldest pending event of a flow
UNRECORDED_KEY = "historyOutbox.0.at"  # when the oldest pending history entry was made


@dataclass(frozen=True)
class Index:
    """One index: its name, key pattern, options, and the queries it serves (docs/scale.rst, Indexes)."""

    name: str
    keys: tuple[tuple[str, int], ...]
    serves: str
    options: tuple[tuple[str, Any], ...] = ()


def _owner_sorted(field: str) -> Index:
    return Index(f"owner_{field}", (("owners.id", ASC), ("deletedAt", ASC), (field, ASC),
                                    ("_id", ASC)),
                 f"GET /flows within an owner scope or with filter[user], sorted by {field}; "
                 "IAM owner removal (owners.id, deletedAt prefix)")


def _live_sorted(field: str) -> Index:
    return Index(f"live_{field}", (("deletedAt", ASC), (field, ASC), ("_id", ASC)),
                 f"GET /flows as administrator, sorted by {field} (also with search)")


INDEXES: tuple[Index, ...] = (
    *(_owner_sorted(field) for field in SORT_FIELDS),
    *(_live_sorted(field) for field in SORT_FIELDS),
    Index("status_lifecycle",
          (("status", ASC), ("deletedAt", ASC), ("statusRetries", ASC), ("statusChangedAt", ASC)),
          "the reconciler's overdue scan (equality on status, deletedAt, statusRetries, range "
          "on statusChangedAt); /metrics counts per status; admin filter[status]"),
    Index("type_live", (("type", ASC), ("deletedAt", ASC)), "admin GET /flows with filter[type]"),
    Index("template_live", (("fromTemplate", ASC), ("deletedAt", ASC)),
          "admin GET /flows with filter[fromTemplate]"),
    # Partial: a flow with nothing pending has no entry at all, so the relay's scan and the
    # backlog gauge cost nothing for it.
    Index("outbox_pending", ((PENDING_KEY, ASC),),
          "the outbox relay's pending scan, oldest event first; /metrics outbox backlog",
          (("partialFilterExpression", {PENDING_KEY: {"$exists": True}}),)),
    # Partial likewise: only flows whose history entries are still to be recorded.
    Index("history_pending", ((UNRECORDED_KEY, ASC),),
          "the relay's sweep for history entries a writer left pending (it died first)",
          (("partialFilterExpression", {UNRECORDED_KEY: {"$exists": True}}),)),
)
INDEX_NAMES = {index.name for index in INDEXES}


@dataclass(frozen=True)
class Find:
    """A query: filter, sort, and the index a real server is told to use (None: its choice)."""

    filter: dict[str, Any]
    sort: list[tuple[str, int]] | None = None
    hint: str | None = None


def by_id(flow_id: Any, **conditions: Any) -> Find:
    """One flow by id, with preconditions: always the _id index."""
    return Find({"_id": flow_id, **conditions}, hint=ID_INDEX)


def by_ids(flow_ids: Sequence[Any], **conditions: Any) -> Find:
    """Several flows by id (a relay's batch), with conditions: the _id index."""
    return Find({"_id": {"$in": list(flow_ids)}, **conditions}, hint=ID_INDEX)


def listing(query: ListQuery, owner_ids: Sequence[str] | None) -> Find:
    """GET /flows: live flows in scope matching the filters, in the requested order."""
    live: dict[str, Any] = {"deletedAt": None}
    scope = None if owner_ids is None else {"owners.id": {"$in": list(owner_ids)}}
    if scope and query.user:  # filter[user] narrows within the scope, never widens it
        live["$and"] = [scope, {"owners.id": query.user}]
    elif scope:
        live.update(scope)
    elif query.user:
        live["owners.id"] = query.user
    for field, value in (("status", query.status), ("type", query.type),
                         ("fromTemplate", query.from_template)):
        if value:
            live[field] = value
    if query.search:
        # re.escape leaves NUL as is; MongoDB refuses a pattern holding a raw NUL byte.
        literal = re.escape(query.search).replace("\x00", "\\x00")
        pattern = {"$regex": literal, "$options": "i"}
        live["$or"] = [{"name": pattern}, {"description": pattern}]
    direction = pymongo.DESCENDING if query.sort_descending else ASC
    sort = [(query.sort_field, direction), ("_id", direction)]
    if scope or query.user:
        hint = f"owner_{query.sort_field}"
    elif query.status:
        hint = "status_lifecycle"
    elif query.type:
        hint = "type_live"
    elif query.from_template:
        hint = "template_live"
    else:
        hint = f"live_{query.sort_field}"
    return Find(live, sort, hint)


def owned_by(owner_id: str) -> Find:
    """Every live flow listing ``owner_id`` among its owners (IAM deletion events)."""
    return Find({"owners.id": owner_id, "deletedAt": None}, hint="owner_createdAt")


def overdue(status: str, changed_before: datetime, retries: int) -> Find:
    """The reconciler's scan: live flows in ``status`` since before ``changed_before``."""
    return Find({"status": status, "deletedAt": None, "statusRetries": retries,
                 "statusChangedAt": {"$lt": changed_before}})


def status_count(status: str) -> Find:
    """Live flows in one status (/metrics)."""
    return Find({"status": status, "deletedAt": None}, hint="status_lifecycle")


def pending() -> Find:
    """Flows with events waiting, oldest waiting event first (relay scan, backlog gauge)."""
    return Find({PENDING_KEY: {"$exists": True}}, [(PENDING_KEY, ASC)], "outbox_pending")


def unrecorded(before: datetime, now: datetime) -> Find:
    """Live flows with history entries pending since before ``before`` and no live lease
    (the relay's sweep), the oldest first."""
    return Find({UNRECORDED_KEY: {"$exists": True, "$lt": before}, "deletedAt": None,
                 **lease_free(now)}, [(UNRECORDED_KEY, ASC)], "history_pending")


def lease_free(now: datetime) -> dict[str, Any]:
    """The condition that no relay holds a live lease on a flow (missing, null or expired)."""
    return {"relayLeaseUntil": {"$not": {"$gte": now}}}


def claimable(now: datetime) -> Find:
    """Pending flows no relay holds a live lease on (missing, null or expired)."""
    scan = pending()
    return Find({**scan.filter, **lease_free(now)}, scan.sort, scan.hint)
