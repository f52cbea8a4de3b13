"""The embedded in-memory FlowStore: the MongoDB backend's semantics, with indexes of its own.

Every query the service makes is answered from an index (by id, owner, status, type,
template, each sort key, the pending outbox order and the reconciler's keys), so requests
do not slow down as flows accumulate. Documents are copied in and out: no caller ever holds
a reference to stored state, and stored documents are replaced, never changed in place.
Keys need no escaping in memory; ``raw`` shows them escaped, as MongoDB stores them.
"""

from __future__ import annotations

import bisect
import heapq
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId

from ..domain import ListQuery
from .base import (
    Fits,
    Lease,
    encode_keys,
    fresh_copy,
    owned_by_any,
    read_until,
    stored_copy,
    utcnow,
)
from .history import MemoryHistoryStore

SORT_FIELDS = ("createdAt", "updatedAt", "name")
_EQUALITY_FIELDS = ("status", "type", "fromTemplate")
# Below this share of the live flows, a page is cut from the candidates sorted on their own;
# above it, walking the sort index and skipping non-candidates is cheaper.
_WALK_SHARE = 0.125
_OWNER_SORTED = "owner:"


# BSON's order between types, for the few fields sorted on (MongoDB sorts mixed types so).
_TYPE_RANK = ((type(None), 1), (bool, 8), (int, 2), (float, 2), (str, 3), (dict, 4), (list, 5),
              (bytes, 6), (ObjectId, 7), (datetime, 9))


def _order(value: Any) -> tuple[int, Any]:
    for kind, rank in _TYPE_RANK:
        if isinstance(value, kind):
            return (rank, value) if rank not in (4, 5) else (rank, repr(value))
    return 10, repr(value)


Key = Any  # a flow's key inside this store: see _key


def _key(flow_id: Any) -> Key:
    """The internal key of a flow id: an ObjectId's 12 bytes, which hash and compare in C
    (ObjectId's own __hash__ and __eq__ are Python code) in the same order as the ids."""
    return flow_id.binary if type(flow_id) is ObjectId else flow_id


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class _Sorted:
    """Index entries ``(order key, id)`` kept in ascending order."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, Key]] = []

    def add(self, entry: tuple[Any, Key]) -> None:
        bisect.insort(self.entries, entry)

    def remove(self, entry: tuple[Any, Key]) -> None:
        position = bisect.bisect_left(self.entries, entry)
        if position < len(self.entries) and self.entries[position] == entry:
            del self.entries[position]

    def __len__(self) -> int:
        return len(self.entries)


def _pending_entry(document: Mapping[str, Any], flow_id: Key) -> tuple[Any, Key] | None:
    """The relay's index key: the flow's oldest waiting event (None: nothing waits)."""
    outbox = document.get("outbox")
    if isinstance(outbox, list) and outbox and isinstance(outbox[0], Mapping) \
            and "storedAt" in outbox[0]:
        return _order(outbox[0]["storedAt"]), flow_id
    return None


def _entries(document: Mapping[str, Any]) -> dict[str, Any]:
    """The key each index holds for ``document`` (absent: the document is not in it)."""
    flow_id = _key(document["_id"])
    keys: dict[str, Any] = {}
    pending = _pending_entry(document, flow_id)
    if pending is not None:
        keys["pending"] = pending
    if document.get("deletedAt") is not None:
        return keys  # a tombstone is only ever looked for by the relay
    owners = document.get("owners")
    keys["owners"] = frozenset(
        _hashable(owner.get("id")) for owner in owners if isinstance(owner, Mapping)
    ) if isinstance(owners, list) else frozenset()
    for field in _EQUALITY_FIELDS:
        keys[field] = _hashable(document.get(field))
    for field in SORT_FIELDS:
        keys[field] = (_order(document.get(field)), flow_id)
        # Each owner's flows in this order too: MongoDB's owner_<sort> compound indexes.
        keys[_OWNER_SORTED + field] = (keys["owners"], keys[field])
    keys["lifecycle"] = ((_hashable(document.get("status")),
                          _hashable(document.get("statusRetries"))),
                         (_order(document.get("statusChangedAt")), flow_id))
    return keys


class MemoryFlowStore:
    """Owner-scoped flows in this process's memory; the same contract as the MongoDB store."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.history = MemoryHistoryStore()
        self._reset()

    def _reset(self) -> None:
        self._documents: dict[Key, dict[str, Any]] = {}
        self._keys: dict[Key, dict[str, Any]] = {}
        self._owners: dict[Any, set[Key]] = {}
        self._equal: dict[str, dict[Any, set[Key]]] = {f: {} for f in _EQUALITY_FIELDS}
        self._sorted = {field: _Sorted() for field in SORT_FIELDS}
        self._owner_sorted: dict[tuple[Any, str], _Sorted] = {}
        self._lifecycle: dict[tuple[Any, Any], _Sorted] = {}
        self._pending = _Sorted()

    # ------------------------------------------------------------------------- indexing

    def _index(self, flow_id: Key, keys: Mapping[str, Any], add: bool) -> None:
        for name, key in keys.items():
            if name == "pending":
                (self._pending.add if add else self._pending.remove)(key)
            elif name == "owners":
                for owner in key:
                    self._member(self._owners, owner, flow_id, add)
            elif name in self._equal:
                self._member(self._equal[name], key, flow_id, add)
            elif name in self._sorted:
                (self._sorted[name].add if add else self._sorted[name].remove)(key)
            elif name.startswith(_OWNER_SORTED):
                field = name[len(_OWNER_SORTED):]
                owners, entry = key
                for owner in owners:
                    self._sorted_member(self._owner_sorted, (owner, field), entry, add)
            else:  # lifecycle
                group, entry = key
                self._sorted_member(self._lifecycle, group, entry, add)

    @staticmethod
    def _sorted_member(index: dict[Any, _Sorted], group: Any, entry: tuple[Any, Key],
                       add: bool) -> None:
        ordered = index.setdefault(group, _Sorted())
        (ordered.add if add else ordered.remove)(entry)
        if not ordered:
            del index[group]

    @staticmethod
    def _member(index: dict[Any, set[Key]], key: Any, flow_id: Key, add: bool) -> None:
        if add:
            index.setdefault(key, set()).add(flow_id)
            return
        members = index.get(key)
        if members is not None:
            members.discard(flow_id)
            if not members:
                del index[key]

    def _store(self, document: dict[str, Any]) -> None:
        """Put ``document`` in place of its previous version, touching only changed keys."""
        flow_id = _key(document["_id"])
        old = self._keys.get(flow_id, {})
        new = _entries(document)
        self._index(flow_id, {n: k for n, k in old.items() if new.get(n) != k}, add=False)
        self._index(flow_id, {n: k for n, k in new.items() if old.get(n) != k}, add=True)
        self._documents[flow_id] = document
        self._keys[flow_id] = new

    def _store_unindexed(self, document: dict[str, Any]) -> None:
        """Put ``document`` in place of its previous version when the change touched only
        fields no index holds (the relay lease, the history outbox)."""
        self._documents[_key(document["_id"])] = document

    def _store_outbox(self, document: dict[str, Any]) -> None:
        """Put ``document`` in place of its previous version when only its outbox changed."""
        flow_id = _key(document["_id"])
        keys = self._keys[flow_id]
        old, new = keys.get("pending"), _pending_entry(document, flow_id)
        if old != new:
            keys = {name: key for name, key in keys.items() if name != "pending"}
            if old is not None:
                self._pending.remove(old)
            if new is not None:
                self._pending.add(new)
                keys["pending"] = new
            self._keys[flow_id] = keys
        self._documents[flow_id] = document

    def _remove(self, flow_id: Key) -> None:
        self._index(flow_id, self._keys.pop(flow_id, {}), add=False)
        del self._documents[flow_id]

    # ------------------------------------------------------------------------- housekeeping

    def ensure_indexes(self) -> None:
        """Nothing to do: the indexes are kept up to date with every write."""

    def ping(self) -> None:
        """The process's own memory always answers."""

    # ------------------------------------------------------------------------- reads

    def _live(self, flow_id: Key) -> dict[str, Any] | None:
        document = self._documents.get(flow_id)
        return document if document is not None and document.get("deletedAt") is None else None

    def get(self, flow_id: ObjectId, owner_ids: Sequence[str] | None = None) -> dict | None:
        """The live flow, if it exists and (when ``owner_ids`` is given) one of them owns it."""
        flow_id = _key(flow_id)
        with self._lock:
            document = self._live(flow_id)
            if document is None or (owner_ids is not None
                                    and not owned_by_any(document, owner_ids)):
                return None
            return fresh_copy(document)

    def _candidates(self, query: ListQuery, owner_ids: Sequence[str] | None
                    ) -> set[Key] | None:
        """Ids satisfying the indexed conditions; None when there are none (every live flow)."""
        sets: list[set[Key]] = []
        if owner_ids is not None:
            sets.append(set().union(*(self._owners.get(owner, ()) for owner in owner_ids)))
        if query.user:
            sets.append(self._owners.get(query.user, set()))
        for field, value in (("status", query.status), ("type", query.type),
                             ("fromTemplate", query.from_template)):
            if value:
                sets.append(self._equal[field].get(value, set()))
        if not sets:
            return None
        sets.sort(key=len)
        found = set(sets[0])
        for other in sets[1:]:
            found &= other
        return found

    def _owner_page(self, query: ListQuery, owner_ids: Sequence[str]) -> tuple[list[Key], int]:
        """A page of the flows of any of ``owner_ids``, merged from their own sort indexes
        (so it costs the page, not the number of flows they own), and their number."""
        indexes = [self._owner_sorted[owner, query.sort_field].entries
                   for owner in dict.fromkeys(owner_ids) if (owner, query.sort_field)
                   in self._owner_sorted]
        if query.sort_descending:
            walk = heapq.merge(*(reversed(entries) for entries in indexes), reverse=True)
        else:
            walk = heapq.merge(*indexes)
        skip = (query.page_number - 1) * query.page_size
        page: list[Key] = []
        previous = None
        for _, flow_id in walk:
            if flow_id == previous:
                continue  # owned under two of the ids: its entries meet in the merge
            previous = flow_id
            if skip:
                skip -= 1
                continue
            page.append(flow_id)
            if len(page) == query.page_size:
                break
        owned = [self._owners[owner] for owner in dict.fromkeys(owner_ids)
                 if owner in self._owners]
        total = len(owned[0]) if len(owned) == 1 else len(set().union(*owned))
        return page, total

    def list(self, query: ListQuery, owner_ids: Sequence[str] | None, *,
             fits: Fits | None = None) -> tuple[list[dict], int]:
        """One page of live flows matching ``query`` within the caller's scope, and the total.

        Copies are made one at a time and no further than ``fits`` allows.
        """
        with self._lock:
            if owner_ids is not None and not (query.user or query.status or query.type
                                              or query.from_template or query.search):
                page, total = self._owner_page(query, owner_ids)
                return self._copies(page, fits), total
            candidates = self._candidates(query, owner_ids)
            if query.search:
                pattern = re.compile(re.escape(query.search), re.IGNORECASE)
                pool = self._documents if candidates is None else candidates
                candidates = {flow_id for flow_id in pool
                              if self._live(flow_id) is not None
                              and _mentions(self._documents[flow_id], pattern)}
            index = self._sorted[query.sort_field]
            total = len(index) if candidates is None else len(candidates)
            skip = (query.page_number - 1) * query.page_size
            wanted = skip + query.page_size
            if candidates is None:
                entries = index.entries
                if query.sort_descending:
                    end = len(entries) - skip
                    window = entries[max(0, end - query.page_size):max(0, end)][::-1]
                else:
                    window = entries[skip:wanted]
                page = [flow_id for _, flow_id in window]
            elif len(candidates) < _WALK_SHARE * len(index):
                keys = self._keys
                field = query.sort_field
                pick = heapq.nlargest if query.sort_descending else heapq.nsmallest
                page = pick(wanted, candidates, key=lambda flow_id: keys[flow_id][field])[skip:]
            else:
                walk = reversed(index.entries) if query.sort_descending else iter(index.entries)
                page = _first(walk, candidates, wanted)[skip:]
            return self._copies(page, fits), total

    def _copies(self, page: Iterable[Key], fits: Fits | None) -> list[dict]:
        return read_until((fresh_copy(self._documents[flow_id]) for flow_id in page), fits)

    def stuck(
        self, status: str, changed_before: datetime, *, retries: int, limit: int = 100
    ) -> list[dict]:
        """Live flows in ``status`` since before ``changed_before``, re-sent ``retries`` times."""
        with self._lock:
            ordered = self._lifecycle.get((status, retries))
            found = []
            date_rank, _ = _order(changed_before)
            for (rank, changed), flow_id in ordered.entries if ordered else ():
                if rank < date_rank:
                    continue  # not a date: MongoDB's $lt compares dates with dates only
                if len(found) >= limit or rank > date_rank or changed >= changed_before:
                    break
                found.append(fresh_copy(self._documents[flow_id]))
            return found

    def owned_by(self, owner_id: str) -> list[ObjectId]:
        """Ids of every live flow that lists ``owner_id`` among its owners."""
        with self._lock:
            return [self._documents[key]["_id"] for key in self._owners.get(owner_id, ())]

    def count_by_status(self, statuses: Sequence[str]) -> dict[str, int]:
        """How many live flows are in each of ``statuses``."""
        with self._lock:
            return {status: len(self._equal["status"].get(status, ())) for status in statuses}

    def outbox_backlog(self) -> tuple[int, datetime | None]:
        """How many events wait for the relay, and when the oldest of them was stored."""
        with self._lock:
            entries = self._pending.entries
            pending = sum(len(self._documents[flow_id]["outbox"]) for _, flow_id in entries)
            oldest = None
            if entries:
                oldest = self._documents[entries[0][1]]["outbox"][0]["storedAt"]
            return pending, oldest

    # ------------------------------------------------------------------------- writes

    def insert(self, document: Mapping[str, Any]) -> dict:
        """Store a new flow (its pending events included) and return it as stored."""
        stored = stored_copy(document)
        stored.setdefault("_id", ObjectId())
        with self._lock:
            if _key(stored["_id"]) in self._documents:
                raise ValueError(f"a flow with id {stored['_id']} is already stored")
            self._store(stored)
            return fresh_copy(stored)

    def update(
        self,
        flow_id: ObjectId,
        *,
        owner_ids: Sequence[str] | None = None,
        owner_count: int | None = None,
        statuses: Sequence[str] | None = None,
        revision: int | Sequence[int] | None = None,
        changes: Mapping[str, Any] | None = None,
        remove_owner: str | None = None,
        events: Sequence[Mapping[str, Any]] = (),
        history: Mapping[str, Any],
        returning: Sequence[str] | None = None,
        lease: Lease | None = None,
    ) -> dict | None:
        """Apply one change atomically if every precondition holds; None when one does not.

        The revision goes up by one, and the change's events and its ``history`` entry join
        the outbox and the history outbox in the same step. Returns the flow as changed, or
        only its ``_id`` and ``returning`` fields when they are given."""
        flow_id = _key(flow_id)
        with self._lock:
            current = self._live(flow_id)
            if current is None or not _holds(current, owner_ids, owner_count, statuses, revision):
                return None
            fields = stored_copy(dict(changes or {}))
            # a change may name its own time (so that its history entry carries the same one)
            if "updatedAt" not in fields:
                fields["updatedAt"] = stored_copy(utcnow())
            updated = {**current, **fields}
            updated["revision"] = current.get("revision", 0) + 1
            updated["historyOutbox"] = [*current.get("historyOutbox", []),
                                        stored_copy(dict(history))]
            if events:
                updated["outbox"] = [*current.get("outbox", []), *stored_copy(list(events))]
            if lease is not None and not self._leased(current, utcnow()):
                updated["relayLeaseOwner"] = lease[0]
                updated["relayLeaseUntil"] = stored_copy(lease[1])
            if remove_owner is not None and isinstance(current.get("owners"), list):
                updated["owners"] = [
                    owner for owner in current["owners"]
                    if not (isinstance(owner, Mapping) and owner.get("id") == remove_owner)]
            self._store(updated)
            if returning is not None:
                updated = {name: updated[name] for name in ("_id", *returning)
                           if name in updated}
            return fresh_copy(updated)

    def drop_pending_history(self, flow_id: ObjectId, entry_ids: Sequence[str]) -> None:
        """Remove pending history entries once they are written to the history."""
        flow_id = _key(flow_id)
        with self._lock:
            document = self._documents.get(flow_id)
            if document is None or not isinstance(document.get("historyOutbox"), list):
                return
            kept = [entry for entry in document["historyOutbox"]
                    if not (isinstance(entry, Mapping) and entry.get("entryId") in entry_ids)]
            self._store_unindexed({**document, "historyOutbox": kept})

    # ------------------------------------------------------------------------- outbox relay

    @staticmethod
    def _leased(document: Mapping[str, Any], now: datetime) -> bool:
        until = document.get("relayLeaseUntil")
        return isinstance(until, datetime) and until >= now

    def pending_flows(self, limit: int) -> list[ObjectId]:
        """Ids of flows with events waiting and no live lease, oldest waiting event first."""
        now = utcnow()
        with self._lock:
            found = []
            for _, flow_id in self._pending.entries:
                if len(found) >= limit:
                    break
                document = self._documents[flow_id]
                if not self._leased(document, now):
                    found.append(document["_id"])
            return found

    def _claim(self, flow_id: ObjectId, relay_id: str, lease: timedelta) -> dict | None:
        """Lease one flow to ``relay_id`` if it still has events and nobody else holds it."""
        flow_id = _key(flow_id)
        now = utcnow()
        with self._lock:
            document = self._documents.get(flow_id)
            if document is None or "pending" not in self._keys[flow_id] \
                    or self._leased(document, now):
                return None
            leased = {**document, "relayLeaseUntil": stored_copy(now + lease),
                      "relayLeaseOwner": relay_id}
            self._store_unindexed(leased)
            return fresh_copy(leased)

    def claim_batch(self, relay_id: str, lease: timedelta, limit: int,
                    flow_ids: Sequence[ObjectId] | None = None) -> list[dict]:
        """Lease up to ``limit`` claimable flows to ``relay_id`` at once, oldest waiting first
        (or those of ``flow_ids`` that are claimable, in that order)."""
        with self._lock:
            candidates = self.pending_flows(limit) if flow_ids is None else flow_ids[:limit]
            leased = (self._claim(flow_id, relay_id, lease) for flow_id in candidates)
            return [flow for flow in leased if flow is not None]

    def finish_batch(self, relay_id: str, *, published: Mapping[ObjectId, Sequence[str]],
                     recorded: Mapping[ObjectId, Sequence[str]] | None = None,
                     deleted: Sequence[ObjectId] = ()) -> None:
        """Drop published events and recorded history entries, give the leases back and
        remove the ``deleted`` tombstones (see the MongoDB store)."""
        with self._lock:
            for flow_id, event_ids in published.items():
                document = self._documents.get(_key(flow_id))
                if document is None or document.get("relayLeaseOwner") != relay_id:
                    continue  # the lease went to another relay: its events stay for it
                if flow_id in deleted:
                    self.history.drop(flow_id)
                    self._remove(_key(flow_id))
                    continue
                outbox = [event for event in document.get("outbox", [])
                          if not (isinstance(event, Mapping) and event.get("eventId") in event_ids)]
                released = {name: value for name, value in document.items()
                            if name not in ("relayLeaseUntil", "relayLeaseOwner")}
                self._store_outbox({**released, "outbox": outbox})
            for flow_id, entry_ids in (recorded or {}).items():
                if flow_id not in deleted:
                    self.drop_pending_history(flow_id, entry_ids)

    def drop_published(self, flow_id: ObjectId, event_id: str) -> None:
        """Remove one event from a flow's outbox once the broker has confirmed it."""
        flow_id = _key(flow_id)
        with self._lock:
            document = self._documents.get(flow_id)
            if document is None or not isinstance(document.get("outbox"), list):
                return
            outbox = [event for event in document["outbox"]
                      if not (isinstance(event, Mapping) and event.get("eventId") == event_id)]
            self._store_outbox({**document, "outbox": outbox})

    def release(self, flow_id: ObjectId, relay_id: str, *, deleted: bool = False) -> None:
        """Give the lease back; a ``deleted`` flow whose events are all out is removed for
        good, its history with it."""
        key = _key(flow_id)
        with self._lock:
            document = self._documents.get(key)
            if document is None:
                return
            if document.get("relayLeaseOwner") == relay_id:
                document = {name: value for name, value in document.items()
                            if name not in ("relayLeaseUntil", "relayLeaseOwner")}
                self._store_unindexed(document)
            if deleted and document.get("deletedAt") is not None \
                    and document.get("outbox") == []:
                self.history.drop(document["_id"])
                self._remove(key)

    def release_batch(self, relay_id: str, flow_ids: Sequence[ObjectId], *,
                      deleted: Sequence[ObjectId] = ()) -> None:
        """:meth:`release` for a batch of flows."""
        with self._lock:
            for flow_id in flow_ids:
                self.release(flow_id, relay_id, deleted=flow_id in deleted)

    # ------------------------------------------------------------------------- test support

    def raw(self, flow_id: ObjectId) -> dict | None:
        """The document with its internal fields, keys escaped as MongoDB would store them."""
        flow_id = _key(flow_id)
        with self._lock:
            document = self._documents.get(flow_id)
            return None if document is None else encode_keys(document)

    def drop_all(self) -> None:
        """Remove every flow."""
        with self._lock:
            self._reset()
            self.history.drop_all()


def _holds(document: Mapping[str, Any], owner_ids: Sequence[str] | None,
           owner_count: int | None, statuses: Sequence[str] | None,
           revision: int | Sequence[int] | None) -> bool:
    """Whether every precondition of an update holds for ``document``."""
    if owner_ids is not None and not owned_by_any(document, owner_ids):
        return False
    owners = document.get("owners")
    if owner_count is not None and not (isinstance(owners, list) and len(owners) == owner_count):
        return False
    if statuses is not None and document.get("status") not in statuses:
        return False
    if isinstance(revision, int):
        return document.get("revision") == revision
    return revision is None or document.get("revision") in revision


def _mentions(document: Mapping[str, Any], pattern: re.Pattern[str]) -> bool:
    return any(isinstance(document.get(field), str) and pattern.search(document[field])
               for field in ("name", "description"))


def _first(walk: Iterable[tuple[Any, Key]], members: set[Key], count: int) -> list[Key]:
    """The first ``count`` keys of an index walk that are among ``members``."""
    found = []
    for _, flow_id in walk:
        if flow_id in members:
            found.append(flow_id)
            if len(found) == count:
                break
    return found
