"""The change feed on MongoDB: each change takes the number after the newest, and a unique _id decides.

Without multi-document transactions a change cannot take its seq in the write that makes
it, so the feed is written after the change, where its history entry is recorded (the
relay, or the writer itself without one). A writer reads the newest seq and inserts its
batch at the numbers right after it, in order; the ``_id`` is unique, so when another
writer took one of those numbers first the insert stops there and the rest go in after the
new newest. A number is thus used only once the one before it is in: the feed has no gaps
for a reader to wait for, and nothing is numbered that is not written (a writer that dies
leaves no hole). Two round trips per batch, neither of them a findAndModify.

A feed remembers the number after its own last insert and tries that first, without the
read: one round trip while no other writer came in between (one process writing, or one
writing at a time). A guess can be stale but never ahead of the feed, since it follows a
number that is in, so a refusal only costs the read it skipped; after one, the feed reads
first for the next ``STALE_PAUSE`` batches, so writers taking turns do not pay it each time.
Writes of other collections (the history entries of the same changes) can ride along with
the first insert, in one command, where the server takes several collections' writes at
once (``bulkWrite``, MongoDB 8.0).

A reader still treats a missing number as one to wait for and then abandon (a hole with
that ``_id``): feeds written by earlier versions, which took numbers from a counter, can
hold such gaps.

Recording is idempotent: ``key`` (flow id and revision) is unique, so a change recorded
again (a retry, two relays, read-repair) keeps its first seq.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import InsertOne
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    DuplicateKeyError,
    InvalidOperation,
)

from .base import DUPLICATE_KEY, database_call, decode_keys, pending_feed_entries, utcnow

COLLECTION = "flow_changes"
STATE = "flow_changes_state"  # {_id: "trimmed", value}: the trim mark
BY_KEY = [("key", pymongo.ASCENDING)]
BY_TIME = [("at", pymongo.ASCENDING)]
BY_FLOW = [("flowId", pymongo.ASCENDING)]
STALE_PAUSE = 8  # batches read first after a guess was refused


def _first_duplicate(failures: Sequence[Mapping[str, Any]] | None, position: str) -> int | None:
    """Where an ordered write stopped, when every failure is a duplicate key; else None."""
    if not failures or any(failure.get("code") != DUPLICATE_KEY for failure in failures):
        return None
    return int(failures[0][position])


class MongoChangeFeed:
    """The change feed in the ``flow_changes`` collection (see the module docstring)."""

    def __init__(self, database: Any, lock: threading.RLock | None = None) -> None:
        self._changes = database[COLLECTION]
        self._state = database[STATE]
        self._lock = lock  # mongomock is not thread-safe: share the flow store's lock
        self._real = isinstance(database, pymongo.database.Database)
        self._indexed = False  # hints only once the indexes exist (mongomock takes none)
        self._next: int | None = None  # the number after this feed's last insert
        self._read_first = 0  # batches left to read the newest before inserting
        self._several_collections = self._real  # until the server says it is older than 8.0

    def _call(self) -> contextlib.AbstractContextManager[None]:
        return database_call(self._lock)

    def ensure_indexes(self) -> None:
        with self._call():
            self._changes.create_index(BY_KEY, name="changes_key", unique=True)
            self._changes.create_index(BY_TIME, name="changes_at")
            self._changes.create_index(BY_FLOW, name="changes_flow")
        self._indexed = self._real

    def _hint(self, name: str) -> dict[str, Any]:
        return {"hint": name} if self._indexed or (self._real and name == "_id_") else {}

    def _after(self, seq: int, limit: int) -> Any:
        return (self._changes.find({"_id": {"$gt": seq}}, {"key": 0}, **self._hint("_id_"))
                .sort("_id", pymongo.ASCENDING).limit(limit))

    def _newest(self) -> Any:
        return (self._changes.find({}, {"_id": 1}, **self._hint("_id_"))
                .sort("_id", pymongo.DESCENDING).limit(1))

    def _recorded(self, keys: Sequence[str]) -> Any:
        return self._changes.find({"key": {"$in": list(keys)}}, {"key": 1, "_id": 0},
                                  **self._hint("changes_key"))

    def _oldest_kept(self, before: datetime) -> Any:
        return (self._changes.find({"at": {"$lt": before}}, {"_id": 1},
                                   **self._hint("changes_at"))
                .sort("at", pymongo.DESCENDING).limit(1))

    def _of_owner(self, flow_id: ObjectId, owner_id: str) -> Any:
        return self._changes.find({"flowId": flow_id, "owners": owner_id}, {"owners": 1},
                                  **self._hint("changes_flow"))

    def record(self, flows: Sequence[Mapping[str, Any]], along: Sequence[Any] = ()) -> bool:
        """Append the changes of the flows' pending history entries, each flow's in
        revision order, at the numbers after the newest: one ordered insert for the batch,
        after a read of the newest unless this feed wrote last; more only when another
        writer came first or some of the changes were recorded before.

        ``along``: writes of other collections (client bulk-write models) to apply after
        the first insert, in its command, where the server can; returns whether they were.
        """
        pending = [(entry, self._key(entry))
                   for flow in flows for entry in pending_feed_entries(flow)]
        sifted = False
        guess = self._guess()
        while pending:
            first = guess if guess is not None else self.newest() + 1
            stopped, went_along = self._insert(
                [{**entry, "_id": first + offset, "key": key}
                 for offset, (entry, key) in enumerate(pending)], along)
            along = ()  # with the first insert only: later tries are the unusual case
            if stopped is None:
                self._next = first + len(pending)
                return went_along
            if stopped:
                self._next = first + stopped
            pending = pending[stopped:]
            if guess is not None:
                # most likely another writer took the number: read the newest and try again
                guess, self._read_first = None, STALE_PAUSE
                continue
            if not sifted:
                # Refused: its number was taken, or it was recorded already (a second relay
                # handed the same flow, a retry). Whatever else of the batch was recorded
                # already is left out at once, with one read, rather than met one by one.
                sifted = True
                with self._call():
                    known = {document["key"] for document in
                             self._recorded([key for _, key in pending])}
                pending = [(entry, key) for entry, key in pending if key not in known]
                continue
            with self._call():
                recorded = next(iter(self._recorded([pending[0][1]])), None)
            pending = pending[recorded is not None:]
        return False

    def _guess(self) -> int | None:
        """The number to try first without reading the newest, if any (module docstring)."""
        if self._read_first:
            self._read_first -= 1
            return None
        return self._next

    def _insert(self, documents: list[dict[str, Any]], along: Sequence[Any] = ()
                ) -> tuple[int | None, bool]:
        """Insert in order (then ``along``, in the same command where the server can): the
        index of the first one refused (a duplicate) or None, and whether ``along`` went."""
        if along and self._several_collections:
            namespace = self._changes.full_name
            try:
                with self._call():
                    self._changes.database.client.bulk_write(
                        [*(InsertOne(namespace=namespace, document=document)
                           for document in documents), *along], ordered=True)
                return None, True
            except InvalidOperation:
                self._several_collections = False  # a server before MongoDB 8.0
            except ClientBulkWriteException as error:
                refused = _first_duplicate(error.write_errors, "idx")
                if refused is None or error.error is not None or error.write_concern_errors:
                    raise
                # a duplicate among the others (a concurrent writer) stops them: not gone
                return (refused if refused < len(documents) else None), False
        try:
            with self._call():
                self._changes.insert_many(documents, ordered=True)
        except BulkWriteError as error:
            refused = _first_duplicate(error.details.get("writeErrors"), "index")
            if refused is None:
                raise
            return refused, False
        return None, False

    @staticmethod
    def _key(entry: Mapping[str, Any]) -> str:
        return f"{entry['flowId']}:{entry['revision']}"

    def after(self, seq: int, limit: int) -> list[dict]:
        """Up to ``limit`` changes (and holes) after ``seq``, in seq order (the _id index)."""
        with self._call():
            found = list(self._after(seq, limit))
        return [{**decode_keys({k: v for k, v in doc.items() if k != "_id"}), "seq": doc["_id"]}
                for doc in found]

    def newest(self) -> int:
        """The largest seq the feed holds (or last trimmed)."""
        with self._call():
            found = list(self._newest())
        return int(found[0]["_id"]) if found else self.trimmed_through()

    def allocated(self) -> int:
        """The largest seq handed out: the newest, as numbers are taken only by inserting."""
        return self.newest()

    def trimmed_through(self) -> int:
        with self._call():
            state = self._state.find_one({"_id": "trimmed"})
        return int(state["value"]) if state else 0

    @staticmethod
    def _hole(seq: int) -> dict[str, Any]:
        return {"_id": seq, "hole": True, "key": f"hole:{seq}", "at": utcnow()}

    def abandon(self, seq: int) -> None:
        """Make ``seq`` a hole unless a change already holds it."""
        if seq <= self.trimmed_through():
            return
        with self._call(), contextlib.suppress(DuplicateKeyError):
            self._changes.insert_one(self._hole(seq))

    def trim(self, before: datetime) -> int:
        """Remove the changes older than ``before`` (up to the newest of them, by seq).

        The trimmed mark is raised first and the entries removed after, so a reader that
        checks the mark after its read can tell that its read may have missed entries."""
        with self._call():
            found = list(self._oldest_kept(before))
            if found:
                self._state.update_one({"_id": "trimmed"}, {"$max": {"value": found[0]["_id"]}},
                                       upsert=True)
                self._changes.delete_many({"_id": {"$lte": found[0]["_id"]}})
        return self.trimmed_through()

    def forget_owner(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> None:
        """Replace a deleted owner's id in the flow's changes."""
        with self._call():
            for doc in list(self._of_owner(flow_id, real_id)):
                owners = [pseudonym if owner == real_id else owner for owner in doc["owners"]]
                self._changes.update_one({"_id": doc["_id"]}, {"$set": {"owners": owners}})

    def explain_reads(self, flow_id: ObjectId) -> dict[str, dict]:
        """``explain()`` of every query of the feed (tests check the plans on a real server)."""
        with self._call():
            return {"after": self._after(1, 10).explain(),
                    "newest": self._newest().explain(),
                    "recorded": self._recorded([f"{flow_id}:1"]).explain(),
                    "trim": self._oldest_kept(utcnow()).explain(),
                    "forgetOwner": self._of_owner(flow_id, "x").explain()}

    def drop_all(self) -> None:
        self._next = None
        with self._call():
            self._changes.drop()
            self._state.drop()
