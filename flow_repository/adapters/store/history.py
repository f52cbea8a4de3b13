"""Storage of flow history on MongoDB: one entry per (flow id, revision).

The protocol every history backend keeps, :class:`HistoryStore`, lives in ``base``."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import UpdateOne

from .base import (
    READ_BATCH,
    Fits,
    HistoryStore,
    Write,
    database_call,
    decode_keys,
    encode_keys,
    read_until,
    write_all,
)

__all__ = ["HistoryStore", "MongoHistoryStore", "pseudonymised"]

COLLECTION = "flow_history"
# Serves every read: one flow's entries by revision, newest first.
BY_FLOW_AND_REVISION = [("flowId", pymongo.ASCENDING), ("revision", pymongo.DESCENDING)]


def pseudonymised(entry: Mapping[str, Any], real_id: str, pseudonym: str) -> dict | None:
    """The entry with ``real_id`` replaced by ``pseudonym`` wherever it names a person or
    tenant (author, owners and tenant of the stored flow); None when it does not occur."""
    result = copy.deepcopy(dict(entry))
    changed = False
    if result.get("sub") == real_id:
        result["sub"] = pseudonym
        changed = True
    flow = result.get("flow")
    if isinstance(flow, dict):
        if flow.get("tenant") == real_id:
            flow["tenant"] = pseudonym
            changed = True
        for owner in flow.get("owners") or []:
            if isinstance(owner, dict) and owner.get("id") == real_id:
                owner["id"] = pseudonym
                changed = True
    return result if changed else None




class MongoHistoryStore:
    """History entries in the ``flow_history`` collection, unique on (flowId, revision).

    Writes are idempotent: an entry is inserted only if its key is free, so writing the
    same pending entry twice (a retry, two relays, a read-repair) leaves one entry.
    """

    def __init__(self, database: Any, lock: threading.RLock | None = None) -> None:
        self._entries = database[COLLECTION]
        self._lock = lock  # mongomock is not thread-safe: share the flow store's lock
        self._real = isinstance(database, pymongo.database.Database)

    def _call(self) -> contextlib.AbstractContextManager[None]:
        return database_call(self._lock)

    def ensure_indexes(self) -> None:
        with self._call():
            self._entries.create_index(BY_FLOW_AND_REVISION, unique=True)

    @staticmethod
    def _writes(entries: Sequence[Mapping[str, Any]]) -> list[Write]:
        return [Write({"flowId": entry["flowId"], "revision": entry["revision"]},
                      {"$setOnInsert": encode_keys(dict(entry))}, upsert=True)
                for entry in entries]

    def record(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Write entries whose key is free, all in one round trip."""
        with self._call():
            write_all(self._entries, self._writes(entries), real=self._real)

    def record_along(self, entries: Sequence[Mapping[str, Any]]) -> list[UpdateOne]:
        """The writes of :meth:`record` as models another collection's bulk write can
        carry (MongoDB 8.0's bulkWrite of several collections)."""
        return [UpdateOne(write.filter, write.change, upsert=True,
                          namespace=self._entries.full_name)
                for write in self._writes(entries)]

    def page(self, flow_id: ObjectId, page_number: int, page_size: int, *,
             fits: Fits | None = None) -> tuple[list[dict], int]:
        """Newest first; the cursor is read in small batches, no further than ``fits`` allows."""
        with self._call():
            total = self._entries.count_documents({"flowId": flow_id})
            cursor = self._page_cursor(flow_id, page_number, page_size).batch_size(
                min(page_size, READ_BATCH))
            try:
                return read_until((decode_keys(entry) for entry in cursor), fits), total
            finally:
                cursor.close()

    def _page_cursor(self, flow_id: ObjectId, page_number: int, page_size: int) -> Any:
        return (self._entries.find({"flowId": flow_id}, {"_id": 0})
                .sort([("revision", pymongo.DESCENDING)])
                .skip((page_number - 1) * page_size).limit(page_size))

    def get(self, flow_id: ObjectId, revision: int) -> dict | None:
        with self._call():
            entry = next(iter(self._get_cursor(flow_id, revision)), None)
        return None if entry is None else decode_keys(entry)

    def _get_cursor(self, flow_id: ObjectId, revision: int) -> Any:
        return self._entries.find({"flowId": flow_id, "revision": revision}, {"_id": 0}).limit(1)

    def definition_at(self, flow_id: ObjectId, revision: int) -> dict | None:
        """The newest definition entry at or before ``revision``: the flow then in force."""
        with self._call():
            found = next(iter(self._definition_cursor(flow_id, revision)), None)
        return None if found is None else decode_keys(found)

    def _definition_cursor(self, flow_id: ObjectId, revision: int) -> Any:
        return (self._entries.find({"flowId": flow_id, "revision": {"$lte": revision},
                                    "kind": "definition"}, {"_id": 0})
                .sort([("revision", pymongo.DESCENDING)]).limit(1)
                # a planner may pick a scan for the range plus filter; the index answers it
                .hint(BY_FLOW_AND_REVISION))

    def explain_reads(self, flow_id: ObjectId) -> dict[str, dict]:
        """``explain()`` of every read query for one flow (tests check the plans use the
        index on a real server)."""
        with self._call():
            return {"page": self._page_cursor(flow_id, 2, 10).explain(),
                    "get": self._get_cursor(flow_id, 3).explain(),
                    "definitionAt": self._definition_cursor(flow_id, 3).explain()}

    def trim(self, flow_id: ObjectId, below_revision: int) -> None:
        with self._call():
            self._entries.delete_many({"flowId": flow_id, "revision": {"$lt": below_revision}})

    def drop(self, flow_id: ObjectId) -> None:
        self.drop_flows([flow_id])

    def drop_flows(self, flow_ids: Sequence[ObjectId]) -> None:
        with self._call():
            self._entries.delete_many({"flowId": {"$in": list(flow_ids)}})

    def pseudonymise(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> int:
        # Read and replace entry by entry: array filters (owners.$[o]) are not in mongomock.
        # Entries never change otherwise, so nothing can be lost between read and replace.
        query = {"flowId": flow_id, "$or": [{"sub": real_id}, {"flow.owners.id": real_id},
                                             {"flow.tenant": real_id}]}
        changed = 0
        with self._call():
            for stored in list(self._entries.find(query)):
                replacement = pseudonymised(decode_keys(stored), real_id, pseudonym)
                if replacement is not None:
                    self._entries.replace_one({"_id": stored["_id"]}, encode_keys(replacement))
                    changed += 1
        return changed

    def drop_all(self) -> None:
        with self._call():
            self._entries.drop()
