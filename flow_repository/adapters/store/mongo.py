"""FlowStore on MongoDB (or mongomock): every pymongo call of the service lives here."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern

from flow_repository.domain.flow import ListQuery
from flow_repository.settings import Settings

from . import queries
from .base import (
    READ_BATCH,
    Fits,
    Lease,
    StoreUnavailable,
    Write,
    database_call,
    decode_keys,
    encode_keys,
    owned_by_any,
    read_until,
    utcnow,
    write_all,
)
from .changes import MongoChangeFeed
from .history import HistoryStore, MongoHistoryStore

log = logging.getLogger(__name__)
# Documents fetched per round trip when a page is read: a list page is read a batch at a time
# and stops at its byte budget, so a page of 1,000 flows is never held whole before the cut.

COLLECTION = "flows"
DEFAULT_DATABASE = "flow-repository"


def _look_up_ids_directly(collection: Any) -> None:
    """Answer mongomock filters on one ``_id`` from its id map instead of a full scan.

    mongomock has no indexes: every find, update, count and delete runs the filter over
    every stored document, so reading one flow costs O(stored flows). A filter naming one
    ObjectId ``_id`` (or a list of them with ``$in``) can match those documents only, so
    only they are checked; the answer is the same. Other filters still scan.
    """
    from mongomock.filtering import filter_applies

    scan = getattr(collection, "_iter_documents", None)
    if scan is None or not hasattr(collection, "_store"):  # other mongomock internals: leave it
        return

    def iter_documents(spec: Any) -> Iterator[dict]:
        key = spec.get("_id") if isinstance(spec, Mapping) else None
        if isinstance(key, ObjectId):
            keys = [key]
        elif (isinstance(key, Mapping) and list(key) == ["$in"]
              and all(isinstance(item, ObjectId) for item in key["$in"])):
            keys = list(dict.fromkeys(key["$in"]))  # the relay's batches: a list of ids
        else:
            return scan(spec)
        found = (collection._store[item] for item in keys if item in collection._store)
        return iter([document for document in found if filter_applies(spec, document)])

    collection._iter_documents = iter_documents


def write_concern(url: str) -> dict[str, Any]:
    """``w: majority`` unless MONGODB_URL names a write concern itself.

    A flow's state and its outbox are one document written together; acknowledged by a
    majority, that write survives a primary failover, so no event the relay may already
    have published can be rolled back with the change that caused it.
    """
    return {} if "w" in parse_qs(urlparse(url).query) else {"w": "majority"}


class FlowStore:
    """Owner-scoped access to the ``flows`` collection; pending events live in each document.

    So do pending history entries (``historyOutbox``): every write that bumps the revision
    pushes exactly one, so the pending entries are consecutive and the last one is at the
    document's revision. ``history`` is where they go once written.
    """

    def __init__(self, database: Any, *, serialize: bool = False,
                 history: HistoryStore | None = None) -> None:
        self._flows = database[COLLECTION]
        # Reads that must not see writes a primary failover could still roll back.
        self._committed = self._flows.with_options(read_concern=ReadConcern("majority"))
        # mongomock is not thread-safe; a real MongoDB serializes per document itself.
        self._lock = threading.RLock() if serialize else None
        self.history = history or MongoHistoryStore(database, self._lock)
        self.changes = MongoChangeFeed(database, self._lock)
        self._real = isinstance(database, pymongo.database.Database)
        self._indexed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> FlowStore:
        """A store on the MongoDB that MONGODB_URL names."""
        if not settings.mongodb_url:
            raise ValueError("MONGODB_URL is not set: use flow_repository.adapters.store.open_store")
        client = pymongo.MongoClient(
            settings.mongodb_url,
            tz_aware=True,
            serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
            connectTimeoutMS=settings.mongodb_timeout_ms,
            appname="flow-repository",
            retryWrites=True,
            **write_concern(settings.mongodb_url),
        )
        name = urlparse(settings.mongodb_url).path.lstrip("/") or DEFAULT_DATABASE
        return cls(client[name])

    @classmethod
    def on_mongomock(cls) -> FlowStore:
        """A store on a fresh in-memory mongomock database (tests of this backend)."""
        import mongomock

        store = cls(mongomock.MongoClient(tz_aware=True)[DEFAULT_DATABASE], serialize=True)
        _look_up_ids_directly(store._flows)
        _look_up_ids_directly(store._committed)
        return store

    atomic_batches = False
    history_with_change = False

    def together(self) -> contextlib.AbstractContextManager[None]:
        """Each write inside stands on its own (no transaction: a change is one document,
        already atomic)."""
        return contextlib.nullcontext()

    def _call(self) -> contextlib.AbstractContextManager[None]:
        return database_call(self._lock)

    # ------------------------------------------------------------------------- housekeeping

    def ensure_indexes(self) -> None:
        """Create the indexes of :mod:`.queries` (idempotent); hints are used once they exist."""
        with self._call():
            for index in queries.INDEXES:
                self._flows.create_index(list(index.keys), name=index.name,
                                         **dict(index.options))
        self.history.ensure_indexes()
        self.changes.ensure_indexes()
        self._indexed = self._real

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        with self._call():
            try:
                self._flows.database.command("ping")
            except PyMongoError as error:
                raise StoreUnavailable(error) from error

    def _hint(self, find: queries.Find) -> dict[str, Any]:
        # mongomock implements no hints; a real server may not have the index yet when
        # ensure_indexes failed at start-up (its planner then chooses on its own).
        return {"hint": find.hint} if self._indexed and find.hint else {}

    def _find(self, find: queries.Find, projection: Mapping[str, Any] | None = None) -> Any:
        cursor = self._flows.find(find.filter, projection, **self._hint(find))
        return cursor.sort(find.sort) if find.sort else cursor

    def _modify(self, find: queries.Find, update: Mapping[str, Any], **options: Any) -> Any:
        return self._flows.find_one_and_update(
            find.filter, update, return_document=ReturnDocument.AFTER, **self._hint(find),
            **options)

    # ------------------------------------------------------------------------- reads

    def get(self, flow_id: ObjectId, owner_ids: Sequence[str] | None = None, *,
            shared: bool = False) -> dict | None:
        """The live flow, if it exists and (when ``owner_ids`` is given) one of them owns it
        (always a fresh copy: ``shared`` allows, but does not need, a shared one)."""
        find = queries.by_id(flow_id)
        with self._call():
            document = self._flows.find_one(find.filter, **self._hint(find))
        # Scope and tombstone are checked here: the _id lookup alone is the query.
        if document is None or document.get("deletedAt") is not None:
            return None
        if owner_ids is not None and not owned_by_any(document, owner_ids):
            return None
        return self._out(document)

    def list(self, query: ListQuery, owner_ids: Sequence[str] | None, *,
             fits: Fits | None = None) -> tuple[list[dict], int]:
        """One page of live flows matching ``query`` within the caller's scope, and the total.

        The cursor is read in small batches and no further than ``fits`` allows.
        """
        find = queries.listing(query, owner_ids)
        with self._call():
            total = self._flows.count_documents(find.filter, **self._hint(find))
            cursor = (self._find(find).skip((query.page_number - 1) * query.page_size)
                      .limit(query.page_size).batch_size(min(query.page_size, READ_BATCH)))
            try:
                return read_until((self._out(doc) for doc in cursor), fits), total
            finally:
                cursor.close()

    def stuck(
        self, status: str, changed_before: datetime, *, retries: int, limit: int = 100
    ) -> list[dict]:
        """Live flows in ``status`` since before ``changed_before``, re-sent ``retries`` times."""
        with self._call():
            cursor = self._find(queries.overdue(status, changed_before, retries)).limit(limit)
            return [self._out(doc) for doc in cursor]

    def owned_by(self, owner_id: str) -> list[ObjectId]:
        """Ids of every live flow that lists ``owner_id`` among its owners."""
        with self._call():
            return [doc["_id"] for doc in self._find(queries.owned_by(owner_id), {"_id": 1})]

    def count_by_status(self, statuses: Sequence[str]) -> dict[str, int]:
        """How many live flows are in each of ``statuses`` (one index count per status)."""
        counts = {}
        with self._call():
            for status in statuses:
                find = queries.status_count(status)
                counts[status] = self._flows.count_documents(find.filter, **self._hint(find))
        return counts

    def outbox_backlog(self) -> tuple[int, datetime | None]:
        """How many events wait for the relay, and when the oldest of them was stored."""
        with self._call():
            pending = 0
            oldest: datetime | None = None
            for doc in self._find(queries.pending(), {"outbox.storedAt": 1, "_id": 0}):
                pending += len(doc["outbox"])
                if oldest is None:  # sorted: the first flow holds the oldest event
                    oldest = decode_keys(doc["outbox"][0]["storedAt"])
            return pending, oldest

    # ------------------------------------------------------------------------- writes

    def insert(self, document: Mapping[str, Any]) -> dict:
        """Store a new flow (its pending events included) and return it as stored."""
        stored = dict(encode_keys(document))
        stored.setdefault("_id", ObjectId())
        with self._call():
            self._flows.insert_one(stored)
        return self._out(stored)

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

        Returns the flow as changed: only ``_id`` and the ``returning`` fields when they are
        given (a caller that needs little saves reading back and decoding the whole flow).

        The preconditions (owner scope and count, statuses, revision) are part of the
        filter, so a concurrent change can never slip between a check and the write. The
        revision is incremented, and the change's events and its ``history`` entry are
        appended to the outbox and the history outbox, in the same write.

        With ``lease`` (relay id, until) the write also leases the flow to that relay when
        no relay holds it, so the writer's own relay publishes the events without claiming
        them first (``relayLeaseOwner`` in the answer tells). When another relay holds the
        lease (or a precondition fails) this costs a second attempt, without the lease.
        """
        conditions: dict[str, Any] = {"deletedAt": None}
        if owner_ids is not None:
            conditions["owners.id"] = {"$in": list(owner_ids)}
        if owner_count is not None:
            conditions["owners"] = {"$size": owner_count}
        if statuses is not None:
            conditions["status"] = {"$in": list(statuses)}
        if isinstance(revision, int):
            conditions["revision"] = revision
        elif revision is not None:
            conditions["revision"] = {"$in": list(revision)}
        fields = dict(changes or {})
        # a change may name its own time (so that its history entry carries the same one)
        if "updatedAt" not in fields:
            fields["updatedAt"] = utcnow()
        update: dict[str, Any] = {
            "$set": encode_keys(fields),
            "$inc": {"revision": 1},
            "$push": {"historyOutbox": encode_keys(dict(history))},
        }
        if events:
            update["$push"]["outbox"] = {"$each": [encode_keys(dict(e)) for e in events]}
        if remove_owner is not None:
            update["$pull"] = {"owners": {"id": remove_owner}}
        projection = None if returning is None else dict.fromkeys(returning, 1)
        with self._call():
            if lease is not None:
                relay_id, until = lease
                leased_update = {**update, "$set": {**update["$set"], "relayLeaseOwner": relay_id,
                                                    "relayLeaseUntil": until}}
                lease_free = queries.by_id(flow_id, **conditions,
                                           **queries.lease_free(utcnow()))
                written = self._modify(lease_free, leased_update, projection=projection)
                if written is not None:
                    return self._out(written)
            return self._out(self._modify(queries.by_id(flow_id, **conditions), update,
                                          projection=projection))

    def record_history(self, flows: Sequence[Mapping[str, Any]],
                       entries: Sequence[Mapping[str, Any]]) -> None:
        """The feed's changes of ``flows`` (their pending entries), then ``entries`` into
        the history: in one command where the server takes several collections' writes
        (MongoDB 8.0) and this process wrote the feed last, else two or three."""
        if not self.changes.record(flows, self.history.record_along(entries)):
            self.history.record(entries)

    def drop_pending_history(self, flow_id: ObjectId, entry_ids: Sequence[str]) -> None:
        """Remove pending history entries once they are written to the history."""
        with self._call():
            self._modify(queries.by_id(flow_id),
                         {"$pull": {"historyOutbox": {"entryId": {"$in": list(entry_ids)}}}},
                         projection={"_id": 1})

    # ------------------------------------------------------------------------- outbox relay

    def pending_flows(self, limit: int) -> list[ObjectId]:
        """Ids of flows with events waiting and no live lease, oldest waiting event first."""
        with self._call():
            cursor = self._find(queries.claimable(utcnow()), {"_id": 1}).limit(limit)
            return [document["_id"] for document in cursor]

    def unrecorded(self, before: datetime, limit: int) -> list[dict]:
        """Up to ``limit`` live flows whose history entries have been pending since before
        ``before`` and that no relay holds a live lease on: left by a writer that died
        before recording them. Oldest first."""
        with self._call():
            cursor = self._find(queries.unrecorded(before, utcnow())).limit(limit)
            return [self._out(document) for document in cursor]

    def claim_batch(self, relay_id: str, until: datetime, limit: int,
                    flow_ids: Sequence[ObjectId] | None = None) -> list[dict]:
        """Lease up to ``limit`` claimable flows to ``relay_id`` until ``until`` at once,
        oldest waiting first (or those of ``flow_ids`` that are claimable, in that order).
        The relay never uses one ``until`` twice: the flows read back as leased with it are
        the ones this very claim leased.

        Three round trips for the whole batch (find the candidates, lease those still free,
        read back the ones leased now), where claiming one flow at a time costs one each;
        two with ``flow_ids``.
        """
        candidates = self.pending_flows(limit) if flow_ids is None else list(flow_ids)[:limit]
        if not candidates:
            return []
        lease_free = queries.by_ids(candidates, **queries.claimable(utcnow()).filter)
        leased_now = queries.by_ids(candidates, relayLeaseOwner=relay_id, relayLeaseUntil=until)
        with self._call():
            self._flows.update_many(
                lease_free.filter,
                {"$set": {"relayLeaseUntil": until, "relayLeaseOwner": relay_id}},
                **self._hint(lease_free))
            # Read back only what a majority holds: an event the relay publishes can then
            # never be rolled back by a primary failover (the lease write, acknowledged by
            # a majority, already covers every change written before it).
            leased = {document["_id"]: document for document in self._committed.find(
                leased_now.filter, **self._hint(leased_now))}
        return [self._out(leased[flow_id]) for flow_id in candidates if flow_id in leased]

    def finish_batch(self, relay_id: str, *, published: Mapping[ObjectId, Sequence[str]],
                     recorded: Mapping[ObjectId, Sequence[str]] | None = None,
                     deleted: Sequence[ObjectId] = ()) -> None:
        """What a relay does after a batch, in one round trip; with ``deleted`` flows, two
        (their history, their removal), and one more when the batch also holds live flows
        or a tombstone gained events meanwhile.

        ``published``: the flows it held leases on, each with the events the broker has
        confirmed; those events leave the outbox and the lease is given back, unless the
        lease has gone to another relay meanwhile. ``recorded``: pending history entries
        now written to the history, which leave the history outbox. ``deleted``: tombstones
        whose events are all out; they are removed for good, their history first (a crash
        in between leaves a hidden tombstone, never history that no flow answers for).
        """
        # Removed in one write each, and only while the outbox holds just the events that
        # went out: dropping them first and the tombstone after would leave, when the
        # process dies in between, a tombstone with nothing pending that no relay ever
        # claims again. When every tombstone went, nothing is left to update for them.
        removals = [Write({"_id": flow_id, "relayLeaseOwner": relay_id, "deletedAt": {"$ne": None},
                           **_holds_only(published.get(flow_id, ()))})
                    for flow_id in deleted if flow_id in published]
        if deleted:
            self.history.drop_flows(deleted)
        with self._call():
            removed = write_all(self._flows, removals, real=self._real, ordered=False)
        gone = set(deleted) if removed == len(removals) else set()
        writes: list[Write] = []
        for flow_id, entry_ids in (recorded or {}).items():
            if entry_ids:
                writes.append(Write(
                    {"_id": flow_id},
                    {"$pull": {"historyOutbox": {"entryId": {"$in": list(entry_ids)}}}}))
        for flow_id, event_ids in published.items():
            if flow_id in gone:
                continue
            if event_ids:
                writes.append(Write({"_id": flow_id, "relayLeaseOwner": relay_id},
                                    {"$pull": {"outbox": {"eventId": {"$in": list(event_ids)}}}}))
            writes.append(Write({"_id": flow_id, "relayLeaseOwner": relay_id},
                                {"$unset": {"relayLeaseUntil": "", "relayLeaseOwner": ""}}))
        with self._call():
            write_all(self._flows, writes, real=self._real, ordered=True)

    # ------------------------------------------------------------------------- test support

    def raw(self, flow_id: ObjectId) -> dict | None:
        """The document exactly as stored: internal fields, escaped keys (tests, diagnostics)."""
        with self._call():
            document = self._flows.find_one({"_id": flow_id})
            return None if document is None else dict(document)

    def explain(self, find: queries.Find, *, count: bool = False, limit: int = 0,
                update: Mapping[str, Any] | None = None, remove: bool = False) -> dict:
        """The server's executionStats explain of ``find`` as this store runs it (diagnostics).

        ``count``: as count_documents runs it; ``update``/``remove``: as find_one_and_update
        or find_one_and_delete run it; otherwise a find with ``limit``.
        """
        name = self._flows.name
        hint = self._hint(find)
        if count:
            command: dict[str, Any] = {"aggregate": name, "pipeline": [
                {"$match": find.filter}, {"$group": {"_id": 1, "n": {"$sum": 1}}}],
                "cursor": {}, **hint}
        elif update is not None or remove:
            command = {"findAndModify": name, "query": find.filter, **hint}
            command.update({"remove": True} if remove else {"update": update})
        else:
            command = {"find": name, "filter": find.filter, **hint}
            if find.sort:
                command["sort"] = dict(find.sort)
            if limit:
                command["limit"] = limit
        with self._call():
            return self._flows.database.command("explain", command,
                                                verbosity="executionStats")

    def drop_all(self) -> None:
        """Remove every flow (tests clean up their own database with it)."""
        with self._call():
            self._flows.drop()
        self._indexed = False  # the indexes went with the collection
        self.history.drop_all()
        self.changes.drop_all()

    @staticmethod
    def _out(document: Mapping[str, Any] | None) -> dict | None:
        return None if document is None else decode_keys(document)


def _holds_only(event_ids: Sequence[str]) -> dict[str, Any]:
    """The condition that a flow's outbox holds exactly the events ``event_ids``."""
    if not event_ids:
        return {"outbox": {"$size": 0}}
    return {"outbox": {"$size": len(event_ids),
                       "$not": {"$elemMatch": {"eventId": {"$nin": list(event_ids)}}}}}
