"""What every store backend shares: the Store contract, the outage error, the clock, keys."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from bson import ObjectId
from pymongo import DeleteOne, UpdateOne
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError

from flow_repository.domain.flow import ListQuery

# Keys MongoDB cannot hold (or would read as operators / paths) are escaped reversibly:
# "~" is the escape character itself, so the mapping stays one-to-one.
_KEY_ESCAPES = {"~": "~t", ".": "~d", "$": "~s", "\x00": "~0"}
_KEY_UNESCAPES = {escaped[1]: raw for raw, escaped in _KEY_ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[~.$\x00]")
_ESCAPED = re.compile(r"~(.)", re.DOTALL)
DUPLICATE_KEY = 11000


# A relay lease a write may take along: the relay's id and when the lease ends.
Lease = tuple[str, datetime]


class StoreUnavailable(Exception):
    """The database could not be reached; the request may be retried later."""

    def __init__(self, cause: Exception, database: str = "MongoDB") -> None:
        # The class name only: pymongo's text names hosts and topology (SQLite's, paths),
        # which /healthcheck would otherwise show to anyone.
        super().__init__(f"{database} is unavailable: {type(cause).__name__}")


@contextlib.contextmanager
def database_call(lock: threading.RLock | None) -> Iterator[None]:
    """Run one database call under ``lock`` (mongomock is not thread-safe; a server needs
    none), turning a lost connection into StoreUnavailable."""
    try:
        if lock is None:
            yield
        else:
            with lock:
                yield
    except ConnectionFailure as error:
        raise StoreUnavailable(error) from error


@dataclass(frozen=True)
class Write:
    """One write of a batch: an update (``change``; ``upsert``) or, without ``change``, a
    delete of the one document ``filter`` matches."""

    filter: Mapping[str, Any]
    change: Mapping[str, Any] | None = None
    upsert: bool = False


def write_all(collection: Any, writes: Sequence[Write], *, real: bool,
              ordered: bool = False) -> int:
    """Apply ``writes`` in one round trip (``bulk_write``; ``ordered``: one after the
    other) on a real server; one by one on mongomock, whose bulk API lags pymongo's. A
    duplicate key of an upsert is not an error: a concurrent writer stored it first.
    Returns how many documents the deletes removed."""
    if not writes:
        return 0
    if not real:
        deleted = 0
        for write in writes:
            try:
                if write.change is None:
                    deleted += collection.delete_one(write.filter).deleted_count
                else:
                    collection.update_one(write.filter, write.change, upsert=write.upsert)
            except DuplicateKeyError:
                pass
        return deleted
    try:
        return collection.bulk_write([
            DeleteOne(write.filter) if write.change is None
            else UpdateOne(write.filter, write.change, upsert=write.upsert)
            for write in writes], ordered=ordered).deleted_count
    except BulkWriteError as error:
        if any(failure.get("code") != DUPLICATE_KEY
               for failure in error.details.get("writeErrors", [])):
            raise
        return int(error.details.get("nRemoved", 0))


def utcnow() -> datetime:
    """Now, at the millisecond precision MongoDB keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def stored_copy(value: Any) -> Any:
    """A stored copy, with MongoDB's value rules: lists for tuples, dates in UTC milliseconds."""
    kind = type(value)
    if kind is str or kind is int or kind is ObjectId or value is None:
        return value  # the common leaves first: isinstance on an ABC is slow
    if kind is datetime and value.tzinfo is UTC and not value.microsecond % 1000:
        return value  # as utcnow() makes them: stored as they are
    if kind is dict or isinstance(value, Mapping):
        return {key: stored_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [stored_copy(item) for item in value]
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).replace(microsecond=moment.microsecond // 1000 * 1000)
    return value


def encode_keys(value: Any) -> Any:
    """Escape user-supplied keys so that MongoDB stores them verbatim."""
    if isinstance(value, Mapping):
        return {
            (_NEEDS_ESCAPE.sub(lambda m: _KEY_ESCAPES[m.group()], key)): encode_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [encode_keys(item) for item in value]
    return value


def decode_keys(value: Any) -> Any:
    """Undo :func:`encode_keys`; stored dates come back timezone-aware (UTC)."""
    if isinstance(value, Mapping):
        return {
            (_ESCAPED.sub(lambda m: _KEY_UNESCAPES.get(m.group(1), m.group()), key)
             if "~" in key else key): decode_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [decode_keys(item) for item in value]
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def owned_by_any(document: Mapping[str, Any], owner_ids: Sequence[str]) -> bool:
    """True when one of ``owner_ids`` is among the document's owner ids (``owners.id``)."""
    owners = document.get("owners")
    if not isinstance(owners, list):
        return False
    return any(isinstance(owner, Mapping) and owner.get("id") in owner_ids for owner in owners)


# Called with each document of a page as it is read; reading stops after the first one for
# which it answers False (that one is still returned), so a page is read no further than the
# caller's byte budget reaches (issue 16: bounded in memory, not only in the answer).
Fits = Callable[[dict], bool]
READ_BATCH = 32  # documents fetched at once while a page is read up to its byte budget


class SharedDocument(dict):
    """A stored flow as a store hands it to every read of the same stored state that only
    reads (a page, GET of one flow): never to be changed. ``projections`` keeps what readers
    derived from it, by the function that derived it, so the next read of that state need
    not derive it again."""

    __slots__ = ("projections",)

    def __init__(self, document: Mapping[str, Any]) -> None:
        super().__init__(document)
        self.projections: dict[Callable[[Any], Any], Any] = {}


def read_until(documents: Iterable[dict], fits: Fits | None) -> list[dict]:
    """The documents of a page, read one at a time until ``fits`` says the budget is spent."""
    kept = []
    for document in documents:
        kept.append(document)
        if fits is not None and not fits(document):
            break
    return kept


class HistoryStore(Protocol):
    """What the use cases need of a history backend (MongoDB/mongomock, or SQLite)."""

    def ensure_indexes(self) -> None: ...

    def record(self, entries: Sequence[Mapping[str, Any]]) -> None: ...

    def page(self, flow_id: ObjectId, page_number: int, page_size: int, *,
             fits: Fits | None = None) -> tuple[list[dict], int]: ...

    def get(self, flow_id: ObjectId, revision: int) -> dict | None: ...

    def definition_at(self, flow_id: ObjectId, revision: int) -> dict | None: ...

    def trim(self, flow_id: ObjectId, below_revision: int) -> None: ...

    def drop(self, flow_id: ObjectId) -> None: ...

    def drop_flows(self, flow_ids: Sequence[ObjectId]) -> None: ...

    def pseudonymise(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> int: ...


# What a change is called in the change feed (GET /flows/events), from its history entry.
_DEFINITION_CHANGES = {"created": "created", "restored": "restored"}


def change_name(entry: Mapping[str, Any]) -> str:
    """The feed's name of a change: created, modified, restored, status or deleted."""
    kind = entry.get("kind")
    if kind == "definition":
        return _DEFINITION_CHANGES.get(entry.get("change"), "modified")
    if kind in ("status", "deleted"):
        return kind
    return "modified"  # owners removed in IAM, and anything newer


def pending_entries(flow: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The history entries a flow document holds pending (``historyOutbox``)."""
    return [entry for entry in flow.get("historyOutbox") or [] if isinstance(entry, Mapping)]


def recorded_entries(flow: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]
                     ) -> list[dict[str, Any]]:
    """``entries``, the flow's newest changes with the last at its revision, as the history
    keeps them: each with its flow id and revision. Empty for a tombstone, whose history
    goes with it."""
    if flow.get("deletedAt") is not None:
        return []
    first = flow["revision"] - len(entries) + 1
    return [{**entry, "flowId": flow["_id"], "revision": first + offset}
            for offset, entry in enumerate(entries)]


def feed_entry(flow: Mapping[str, Any], entry: Mapping[str, Any], revision: int, *,
               status: Any = None, owners: Any = None) -> dict[str, Any]:
    """The change feed's record of one change of ``flow`` (its history ``entry``, at
    ``revision``): what a watcher is told, and what its visibility and filters are checked
    against (the flow's owner ids, status, type and template as the change left them)."""
    found = owners if owners is not None else flow.get("owners")
    owner_ids = [owner.get("id") for owner in found or [] if isinstance(owner, Mapping)]
    return {"flowId": flow["_id"], "revision": revision, "change": change_name(entry),
            "status": status if status is not None else flow.get("status"),
            "owners": [owner for owner in owner_ids if isinstance(owner, str)],
            "type": flow.get("type"), "fromTemplate": flow.get("fromTemplate"),
            "at": entry.get("at") or utcnow()}


def pending_feed_entries(flow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The feed records of a flow document's pending history entries, oldest first.

    Pending entries are consecutive and the last is at the document's revision. The status
    each left is walked back from the document's: a status entry names its own, and the
    entries before it were made in the status it came from."""
    pending = pending_entries(flow)
    first = (flow.get("revision") or 0) - len(pending) + 1
    status = flow.get("status")
    records = []
    for offset in reversed(range(len(pending))):
        entry = pending[offset]
        change = entry.get("status") if entry.get("kind") == "status" else None
        if isinstance(change, Mapping) and change.get("to"):
            status = change["to"]
        definition = entry.get("flow") if entry.get("kind") == "definition" else None
        owners = definition.get("owners") if isinstance(definition, Mapping) else None
        records.append(feed_entry(flow, entry, first + offset, status=status, owners=owners))
        if isinstance(change, Mapping) and change.get("from"):
            status = change["from"]
    records.reverse()
    return records


class ChangeFeed(Protocol):
    """The service-wide change feed behind GET /flows/events (docs/watch.rst).

    Every change gets a sequence number (``seq``) ordering it among all changes; reads are
    by ``seq``. A number may be a *hole* (``{"seq": n, "hole": True}``): a number no
    change holds, decided once and for all by :meth:`abandon`.
    """

    def ensure_indexes(self) -> None: ...

    def record(self, flows: Sequence[Mapping[str, Any]]) -> None: ...

    def after(self, seq: int, limit: int) -> list[dict]: ...

    def newest(self) -> int: ...

    def allocated(self) -> int: ...

    def trimmed_through(self) -> int: ...

    def abandon(self, seq: int) -> None: ...

    def trim(self, before: datetime) -> int: ...

    def forget_owner(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> None: ...


class Store(Protocol):
    """The contract every backend keeps (MongoDB in mongo.py, SQLite in sqlite.py).

    Flows are documents with an ``_id``; a flow is live until ``deletedAt`` is set, and a
    deleted flow stays as a hidden tombstone until the relay has published its last event.
    Every method returns fresh copies: callers never hold stored state, except that the
    documents of list() and get(shared=True) may be SharedDocuments, read only. Each change
    also writes one history entry: into ``history`` in the change's own transaction where
    the store has transactions (SQLite), else queued in the flow (``historyOutbox``) and
    written into ``history`` next (MongoDB).
    """

    history: HistoryStore
    changes: ChangeFeed
    # True when together() commits or rolls back its writes as one (SQLite); MongoDB
    # applies each write on its own there.
    atomic_batches: bool
    # True when a change's history entry is written with it, never left pending (SQLite).
    history_with_change: bool

    def ensure_indexes(self) -> None: ...
    def together(self) -> contextlib.AbstractContextManager[None]: ...
    def ping(self) -> None: ...
    def get(self, flow_id: ObjectId, owner_ids: Sequence[str] | None = None, *,
            shared: bool = False) -> dict | None: ...
    def list(self, query: ListQuery, owner_ids: Sequence[str] | None, *,
             fits: Fits | None = None) -> tuple[list[dict], int]: ...
    def stuck(self, status: str, changed_before: datetime, *, retries: int,
              limit: int = 100) -> list[dict]: ...
    def owned_by(self, owner_id: str) -> list[ObjectId]: ...
    def count_by_status(self, statuses: Sequence[str]) -> dict[str, int]: ...
    def outbox_backlog(self) -> tuple[int, datetime | None]: ...
    def insert(self, document: Mapping[str, Any]) -> dict: ...
    def update(self, flow_id: ObjectId, *, owner_ids: Sequence[str] | None = None,
               owner_count: int | None = None, statuses: Sequence[str] | None = None,
               revision: int | Sequence[int] | None = None,
               changes: Mapping[str, Any] | None = None, remove_owner: str | None = None,
               events: Sequence[Mapping[str, Any]] = (),
               history: Mapping[str, Any],
               returning: Sequence[str] | None = None,
               lease: Lease | None = None) -> dict | None: ...
    def record_history(self, flows: Sequence[Mapping[str, Any]],
                       entries: Sequence[Mapping[str, Any]]) -> None: ...
    def drop_pending_history(self, flow_id: ObjectId, entry_ids: Sequence[str]) -> None: ...
    def pending_flows(self, limit: int) -> list[ObjectId]: ...
    def unrecorded(self, before: datetime, limit: int) -> list[dict]: ...
    def claim_batch(self, relay_id: str, until: datetime, limit: int,
                    flow_ids: Sequence[ObjectId] | None = None) -> list[dict]: ...
    def finish_batch(self, relay_id: str, *, published: Mapping[ObjectId, Sequence[str]],
                     recorded: Mapping[ObjectId, Sequence[str]] | None = None,
                     deleted: Sequence[ObjectId] = ()) -> None: ...
    def raw(self, flow_id: ObjectId) -> dict | None: ...
    def drop_all(self) -> None: ...
