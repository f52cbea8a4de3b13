"""The embedded store on SQLite (Python's sqlite3): flows, their outbox and their history.

One database file (WAL mode) is shared by every thread, gunicorn worker and ``worker``
process on the machine; ``:memory:`` keeps nothing and serves one process. A flow is one
row: the document as JSON, plus the columns its queries and indexes need (computed from
the document on every write). Owners get a table of their own, with each flow's sort keys
copied in, so that owner-scoped pages are read in order from an index. Every write is one
``BEGIN IMMEDIATE`` transaction: a change, its outbox events, its history entry and its
change feed record are committed together or not at all. (The MongoDB backend's single
document update holds the history entry in the flow until a relay records it.)
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from bson import ObjectId

from flow_repository.domain.flow import ListQuery

from .base import (
    READ_BATCH,
    Fits,
    Lease,
    SharedDocument,
    StoreUnavailable,
    encode_keys,
    feed_entry,
    owned_by_any,
    pending_entries,
    read_until,
    recorded_entries,
    stored_copy,
    utcnow,
)
from .checkpoints import BACKSTOP_PAGES, WalCheckpointer
from .history import pseudonymised

MEMORY = ":memory:"
SCHEMA_VERSION = 3  # 2: the change feed (flow_changes, feed_state); 3: generations, history_at
# How many list totals a process keeps (see CountedTotals).
COUNTED_TOTALS = 512
# How many flows read for readers only a process keeps decoded, and how many characters
# of their stored text at most (see SharedDocuments): about 6 MiB with small flows, 10 at most.
SHARED_DOCUMENTS = 1024
SHARED_DOCUMENT_CHARS = 1024 * 1024
# How long a write waits for another process's transaction before giving up (503).
BUSY_TIMEOUT_SECONDS = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
# Errors that say the database is unavailable for now, not that a query is wrong.
_UNAVAILABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR,
                sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL, sqlite3.SQLITE_PROTOCOL,
                sqlite3.SQLITE_READONLY, sqlite3.SQLITE_NOMEM}

# ----------------------------------------------------------------------------- schema

# Columns computed from the document on every write (see _columns), in this order.
COLUMNS = ("deleted", "status", "type", "template", "name", "created", "updated", "retries",
           "changed", "revision", "owner_count", "search_name", "search_description",
           "pending_at", "pending_count", "history_at")
SORT_COLUMNS = {"createdAt": "created", "updatedAt": "updated", "name": "name"}

SCHEMA = (
    # id: an ObjectId's 12 bytes. doc: the document as JSON without _id and the relay lease,
    # which live in their own columns (a lease changes without rewriting the document).
    # deleted is NULL while the flow is live, 1 for a tombstone (so partial indexes can
    # leave tombstones out). The sort keys (name, created, updated, pending_at) follow
    # MongoDB's order between types, see sort_key.
    """CREATE TABLE IF NOT EXISTS flows (
        id BLOB NOT NULL UNIQUE,
        doc TEXT NOT NULL,
        lease_until INTEGER,
        lease_owner TEXT,
        deleted INTEGER, status, type, template, name, created, updated, retries,
        changed INTEGER, revision, owner_count INTEGER,
        search_name BLOB, search_description BLOB,
        pending_at, pending_count INTEGER, history_at INTEGER)""",
    # One row per (live flow, owner id), with the flow's sort keys: tombstones have none.
    """CREATE TABLE IF NOT EXISTS flow_owners (
        fid BLOB NOT NULL, owner NOT NULL, name, created, updated,
        PRIMARY KEY (fid, owner)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS flow_history (
        fid BLOB NOT NULL, revision INTEGER NOT NULL, kind TEXT, entry TEXT NOT NULL,
        PRIMARY KEY (fid, revision))""",
    # The change feed (GET /flows/events): seq orders every change of every flow. It is
    # allocated inside the write transaction of the change itself, and SQLite runs one
    # write transaction at a time, so changes become visible in seq order: a reader that
    # sees seq n can never see a smaller one appear later. AUTOINCREMENT: a number is
    # never used twice, even after the rows holding the largest were trimmed. A row
    # without fid is a hole (a number no change holds).
    """CREATE TABLE IF NOT EXISTS flow_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, fid BLOB, revision INTEGER,
        at INTEGER NOT NULL, entry TEXT NOT NULL)""",
    # trimmed: the change feed holds nothing at or below this seq any more
    """CREATE TABLE IF NOT EXISTS feed_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    # membership: changes whenever a flow starts or stops being listed for someone (a flow
    # or an owner row added or removed, a tombstone set), through the triggers below, in the
    # transaction that does it. While it stands, a list's total stands: see CountedTotals.
    """CREATE TABLE IF NOT EXISTS generations (name TEXT PRIMARY KEY, value INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO generations (name, value) VALUES ('membership', 0)",
    *(f"CREATE TRIGGER IF NOT EXISTS membership_{name} AFTER {event} BEGIN "
      "UPDATE generations SET value = value + 1 WHERE name = 'membership'; END"
      for name, event in (
          ("owner_added", "INSERT ON flow_owners"),
          ("owner_removed", "DELETE ON flow_owners"),
          ("owner_changed", "UPDATE OF fid, owner ON flow_owners"),
          ("flow_added", "INSERT ON flows"),
          ("flow_removed", "DELETE ON flows"),
          ("flow_tombstoned", "UPDATE OF deleted ON flows WHEN OLD.deleted IS NOT NEW.deleted"))),
)

# name -> (definition, the queries it serves: docs/scale.rst "Indexes")
INDEXES: dict[str, tuple[str, str]] = {
    **{f"owner_{field}": (
        f"ON flow_owners (owner, {column}, fid)",
        (f"GET /flows within an owner scope or with filter[user], sorted by {field}; "
        "IAM owner removal")) for field, column in SORT_COLUMNS.items()},
    **{f"live_{field}": (
        f"ON flows ({column}, id) WHERE deleted IS NULL",
        f"GET /flows as administrator, sorted by {field} (also with search); live counts")
       for field, column in SORT_COLUMNS.items()},
    "status_lifecycle": (
        "ON flows (status, retries, changed) WHERE deleted IS NULL",
        "the reconciler's overdue scan; /metrics counts per status; admin filter[status]"),
    "type_live": ("ON flows (type) WHERE deleted IS NULL", "admin GET /flows with filter[type]"),
    "template_live": ("ON flows (template) WHERE deleted IS NULL",
                      "admin GET /flows with filter[fromTemplate]"),
    # Partial: a flow with nothing pending has no entry, so the relay's scan and the
    # backlog gauge cost nothing for it.
    "outbox_pending": (("ON flows (pending_at, id, lease_until, pending_count) "
                       "WHERE pending_at IS NOT NULL"),
                       "the outbox relay's pending scan, oldest event first; /metrics backlog"),
    "history_pending": ("ON flows (history_at, id) WHERE history_at IS NOT NULL",
                        "the relay's sweep for history entries a writer left pending"),
    "changes_at": ("ON flow_changes (at)", "trimming the change feed to WATCH_RETENTION_SECONDS"),
    "changes_flow": ("ON flow_changes (fid)",
                     "replacing a deleted owner's id in the change feed (IAM deletion events)"),
}


# ----------------------------------------------------------------------------- values


def millis(moment: datetime) -> int:
    """Milliseconds since the epoch (a naive datetime is taken as UTC, as MongoDB does)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MILLISECOND


def from_millis(value: int) -> datetime:
    """The timezone-aware UTC datetime of ``millis``."""
    return _EPOCH + timedelta(milliseconds=value)


# Type ranks of MongoDB's sort order that SQLite's own order (NULL, numbers, text, blobs)
# cannot express: these values become blobs led by their rank, after all text.
_RANK_OBJECT, _RANK_ARRAY, _RANK_BINARY, _RANK_OBJECTID, _RANK_BOOL, _RANK_DATE = (
    b"\x04", b"\x05", b"\x06", b"\x07", b"\x08", b"\x09")
_INT64 = 1 << 63


def sort_key(value: Any) -> Any:
    """A column value that SQLite orders as MongoDB orders ``value`` among other types:
    null < numbers < strings < objects < arrays < binary < ObjectId < booleans < dates."""
    kind = type(value)
    if value is None or kind is str:
        return value
    if kind is bool:
        return _RANK_BOOL + (b"\x01" if value else b"\x00")
    if kind is int:
        return value if -_INT64 <= value < _INT64 else float(value)
    if kind is float:
        return value
    if isinstance(value, datetime):
        return _RANK_DATE + (millis(value) + _INT64).to_bytes(8, "big")
    if kind is ObjectId:
        return _RANK_OBJECTID + value.binary
    if isinstance(value, bytes):
        return _RANK_BINARY + value
    if isinstance(value, list | tuple):
        return _RANK_ARRAY + dumps(list(value)).encode()
    return _RANK_OBJECT + dumps(value).encode()


# JSON has no dates or ObjectIds: they are written as {"$date": ms} and {"$oid": hex}. A
# stored object of one key is a tag only then; the one-key objects of the flow itself that
# could be taken for a tag get "$esc" before their key (and lose it when read).
_DATE, _OID, _ESCAPE = "$date", "$oid", "$esc"


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, Mapping):
        if len(value) == 1:
            [(key, item)] = value.items()
            if isinstance(key, str) and (key in (_DATE, _OID) or key.startswith(_ESCAPE)):
                return {_ESCAPE + key: _plain(item)}
        return {key: _plain(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return [_plain(item) for item in value]
    return _tag(value)


def _tag(value: Any) -> dict[str, Any]:
    """The tagged JSON object of a value JSON has no type for (a date, an ObjectId)."""
    if isinstance(value, datetime):
        return {_DATE: millis(value)}
    if type(value) is ObjectId:
        return {_OID: str(value)}
    raise TypeError(f"the embedded store cannot keep a value of type {type(value).__name__}")


def _tagged(value: dict[str, Any]) -> Any:
    """The value a tag or an escaped object stands for; any other object as it is."""
    if len(value) == 1:
        [(key, item)] = value.items()
        if key == _DATE:
            return from_millis(item)
        if key == _OID:
            return ObjectId(item)
        if key.startswith(_ESCAPE):
            return {key[len(_ESCAPE):]: item}
    return value


def dumps(value: Any) -> str:
    """``value`` as the JSON the store keeps (dates and ObjectIds tagged, keys verbatim).

    JSON's own encoder writes the document, and tags the dates and ObjectIds it meets. Only
    when an object of the document itself starts with a "$" key (which may need escaping)
    is the document walked in Python instead: the count of objects starting ``{"$`` tells,
    as a quote inside a string is always written escaped.
    """
    tags = 0

    def counted_tag(item: Any) -> Any:
        nonlocal tags
        if isinstance(item, Mapping):
            return dict(item)
        tags += 1
        return _tag(item)

    text = _encode(value, counted_tag)
    if text.count('{"$') == tags:
        return text
    return _encode(_plain(value), _tag)


def _encode(value: Any, default: Callable[[Any], Any]) -> str:
    """``json.dumps(value, separators=(",", ":"), default=default)``, without building a
    JSONEncoder per call: a change writes several documents, and that cost a status report
    a tenth of its time."""
    if _c_make_encoder is None:
        return json.dumps(value, separators=(",", ":"), default=default)
    return "".join(_c_make_encoder({}, default, _encode_ascii, None, ":", ",", False, False,
                                   True)(value, 0))


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_ascii = json.encoder.encode_basestring_ascii
_decode = json.JSONDecoder(object_hook=_tagged).decode


def loads(text: str) -> Any:
    """Undo :func:`dumps`: dates come back timezone-aware (UTC), ObjectIds as ObjectIds."""
    # text with no tag needs no hook: every object is taken as it is
    return json.loads(text) if '{"$' not in text else _decode(text)


def flow_key(flow_id: Any) -> bytes | str:
    """The ``id`` column of a flow id: an ObjectId's 12 bytes (other ids as JSON text)."""
    return flow_id.binary if type(flow_id) is ObjectId else dumps(flow_id)


def _flow_id(key: bytes | str) -> Any:
    return ObjectId(key) if isinstance(key, bytes) else loads(key)


def _scalar(value: Any) -> Any:
    """An equality column: strings and numbers as they are; nothing else can match."""
    return value if type(value) in (str, int, float) else None


def _searchable(value: Any) -> bytes | None:
    # Lower-cased UTF-8 bytes: instr() on blobs compares bytes, NUL included, and a search
    # term is then found literally (no pattern language at all).
    return value.lower().encode("utf-8", "surrogatepass") if isinstance(value, str) else None


def search_term(text: str) -> bytes:
    """The bytes :func:`_searchable` columns are searched for."""
    return text.lower().encode("utf-8", "surrogatepass")


def _first_item(items: Any) -> Mapping[str, Any]:
    """The first item of a stored list (an outbox), or an empty mapping."""
    first = items[0] if isinstance(items, list) and items else None
    return first if isinstance(first, Mapping) else {}


def _columns(document: Mapping[str, Any]) -> tuple[Any, ...]:
    """The indexed columns of ``document``, in the order of COLUMNS."""
    outbox = document.get("outbox")
    pending_count = len(outbox) if isinstance(outbox, list) else None
    stored_at = _first_item(outbox).get("storedAt")
    pending_at = None if stored_at is None else sort_key(stored_at)
    made_at = _first_item(document.get("historyOutbox")).get("at")
    # a tombstone's entries are recorded by the relay that deletes it, not swept
    history_at = millis(made_at) if isinstance(made_at, datetime) \
        and document.get("deletedAt") is None else None
    owners = document.get("owners")
    revision = document.get("revision")
    return (
        None if document.get("deletedAt") is None else 1,
        _scalar(document.get("status")), _scalar(document.get("type")),
        _scalar(document.get("fromTemplate")),
        sort_key(document.get("name")), sort_key(document.get("createdAt")),
        sort_key(document.get("updatedAt")),
        _scalar(document.get("statusRetries")), _moment(document.get("statusChangedAt")),
        revision if type(revision) is int else None,
        len(owners) if isinstance(owners, list) else None,
        _searchable(document.get("name")), _searchable(document.get("description")),
        pending_at, pending_count, history_at,
    )


def _moment(value: Any) -> int | None:
    return millis(value) if isinstance(value, datetime) else None


# What a status change may set, written into the stored JSON in place (no document read
# back and rewritten), with the columns each field keeps: None when it keeps none.
STATUS_FIELDS: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "status": ("status", _scalar), "statusRetries": ("retries", _scalar),
    "statusChangedAt": ("changed", _moment), "updatedAt": ("updated", sort_key),
    "statusReason": None,
}


def _owner_ids(document: Mapping[str, Any]) -> list[Any]:
    """The owner ids a live flow is listed under (none for a tombstone)."""
    owners = document.get("owners")
    if document.get("deletedAt") is not None or not isinstance(owners, list):
        return []
    found = (owner.get("id") for owner in owners if isinstance(owner, Mapping))
    return list(dict.fromkeys(owner for owner in found if type(owner) in (str, int, float)))


# ----------------------------------------------------------------------------- the database


class Database:
    """One SQLite database and this process's connections to it.

    A file is read through a connection per thread and written through one connection per
    process, whose threads take turns on it (see _write_connection); in WAL mode readers
    never wait for the writer and several processes can share the file. ``:memory:`` is one
    connection that every thread takes in turn. Write transactions begin IMMEDIATE: they
    take the file's write lock first, waiting up to BUSY_TIMEOUT_SECONDS for another
    process's transaction, so two writers never both read and then collide on upgrading.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.in_memory = path == MEMORY
        self._local = threading.local()
        # :memory: has one connection; its users take turns
        self._turn = threading.RLock() if self.in_memory else None
        self._shared: sqlite3.Connection | None = None
        self._opened: list[sqlite3.Connection] = []
        self._writers = threading.Lock()
        self._writers_pid = os.getpid()
        self._writer: sqlite3.Connection | None = None  # see _write_connection
        self._turn_file_descriptor: int | None = None  # this process's, of <path>.write-turn
        self._turn_pid: int | None = None
        self._opened_lock = threading.Lock()
        self._trace: Callable[[str], None] | None = None
        self._checkpointer = None if self.in_memory else WalCheckpointer(path)

    def _connect(self) -> sqlite3.Connection:
        if self.in_memory:
            connection = sqlite3.connect(MEMORY, isolation_level=None, check_same_thread=False)
        else:
            directory = Path(self.path).parent
            # like the dev token secret beside it: the data is this user's alone
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS,
                                         isolation_level=None, check_same_thread=False)
            # WAL: readers never block the writer; a commit survives the process being
            # killed (NORMAL syncs at checkpoints, so only a power loss can cost the last
            # commits, never the file's consistency).
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            # this process's WalCheckpointer checkpoints; a writer only when it falls behind
            connection.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        if self._trace is not None:
            connection.set_trace_callback(self._trace)
        self._create_schema(connection)
        with self._opened_lock:
            self._opened.append(connection)
        return connection

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer flow-repository "
                               f"(schema {version}); this one reads schema {SCHEMA_VERSION}")
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                connection.execute(statement)
            # a file of an earlier schema: its flows table lacks the newer columns (NULL
            # until the flow is next written)
            present = {row[1] for row in connection.execute("PRAGMA table_info(flows)")}
            for column in COLUMNS:
                if column not in present:
                    connection.execute(f"ALTER TABLE flows ADD COLUMN {column}")
            for name, (definition, _) in INDEXES.items():
                connection.execute(f"CREATE INDEX IF NOT EXISTS {name} {definition}")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self.in_memory:
            if self._shared is None:
                self._shared = self._connect()
            return self._shared
        local = self._local
        # A connection must not cross a fork: a forked child opens its own.
        if getattr(local, "pid", None) != os.getpid():
            local.connection = self._connect()
            local.pid = os.getpid()
        return local.connection

    @contextlib.contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        try:
            if self._turn is None:
                yield self._connection()
            else:
                with self._turn:
                    yield self._connection()
        except sqlite3.Error as error:
            _raise_unavailable(error)
            raise

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection whose statements all read one snapshot of the database."""
        writing = self._open_write()
        if writing is not None:  # inside a write: its transaction is the snapshot
            yield writing
            return
        with self._using() as connection:
            if connection.in_transaction:  # nested in another reading() block
                yield connection
                return
            connection.execute("BEGIN")
            try:
                yield connection
            finally:
                connection.execute("COMMIT")

    def writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection in one write transaction, committed when the block ends normally.

        Inside this thread's open write transaction, the block joins it: a burst of status
        reports is one transaction of many writes, and joining costs next to nothing."""
        joined = self._open_write()
        return _Joined(joined) if joined is not None else self._write_transaction()

    def _open_write(self) -> sqlite3.Connection | None:
        """The connection of this thread's open write transaction, if it has one."""
        return getattr(self._local, "writing", None)

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        with self._using() as connection:
            if connection.in_transaction:  # a reading() block's snapshot: joined as it is
                yield connection
                return
            with self._writer_turn():
                connection = self._write_connection()
                connection.execute("BEGIN IMMEDIATE")
                self._local.writing = connection
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                finally:
                    self._local.writing = None
                try:
                    connection.execute("COMMIT")
                except BaseException:
                    # not left open: the thread's next write would join it and never commit
                    if connection.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
                    raise
                if self._checkpointer is not None:
                    self._checkpointer.committed()

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """The file's turn to write, taken before SQLite's write lock. Threads of one
        process queue on a lock that wakes the next at once; between processes, the one
        waiting tries a lock file every 50 µs at first, 1 ms at most. SQLite's own busy
        wait sleeps 1, 2, 5, 10... ms between tries: with several writers, a commit could
        wait hundreds of them (POST p99 470 ms). Waiting longer than BUSY_TIMEOUT_SECONDS
        is unavailability (503), as SQLite's wait is."""
        if self.in_memory:
            yield
            return
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        writers = self._process_writers()
        if not writers.acquire(timeout=BUSY_TIMEOUT_SECONDS):
            raise StoreUnavailable(TimeoutError("write turn"), "SQLite")
        try:
            turn = self._turn_file()
            pause = 0.00005
            while True:
                try:
                    fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as busy:
                    if time.monotonic() > deadline:
                        raise StoreUnavailable(busy, "SQLite") from busy
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
            try:
                yield
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)
        finally:
            writers.release()

    def _write_connection(self) -> sqlite3.Connection:
        """The connection this process writes on, its write turn held. One for all the
        process's threads: SQLite drops a connection's page cache whenever another
        connection wrote, so a connection per thread read back, from the WAL, every page
        of every index a write touches (about 30 reads per POST); the process's own
        consecutive writes now find them cached. A forked child opens its own (see
        _process_writers)."""
        if self.in_memory:
            return self._connection()
        if self._writer is None:
            self._writer = self._connect()
        return self._writer

    def _process_writers(self) -> threading.Lock:
        """This process's queue of writing threads (a forked child starts a queue of its
        own: a lock held by a thread of the parent would never be let go there), and with
        it the connection they write on: a connection must not cross a fork."""
        if self._writers_pid != os.getpid():
            self._writers, self._writers_pid = threading.Lock(), os.getpid()
            self._writer = None
        return self._writers

    def _turn_file(self) -> int:
        """This process's descriptor of the file ``<database>.write-turn``."""
        if self._turn_pid != os.getpid():
            try:
                turn = os.open(f"{self.path}.write-turn", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:  # as SQLite's own files: the directory is not writable
                raise StoreUnavailable(error, "SQLite") from error
            self._turn_file_descriptor, self._turn_pid = turn, os.getpid()
        return self._turn_file_descriptor

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        """Every row of one read statement (one statement needs no explicit transaction)."""
        writing = self._open_write()
        if writing is not None:  # inside a write: read what it wrote so far
            return writing.execute(sql, parameters).fetchall()
        with self._using() as connection:
            return connection.execute(sql, parameters).fetchall()

    def trace(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback`` with every statement run from now on, its values filled in
        (the EXPLAIN QUERY PLAN tests run each of them again)."""
        self._trace = callback
        with self._opened_lock:
            for connection in self._opened:
                connection.set_trace_callback(callback)

    def backup(self, target: str) -> None:
        """Copy the database, while it is in use, into the file ``target`` (replaced
        atomically: a crash leaves either the old file or the complete copy)."""
        temporary = f"{target}.partial"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        copy = sqlite3.connect(temporary)
        try:
            with self._using() as connection:
                # SQLite's online backup API, all pages in one step: one read transaction,
                # so the copy is one consistent state; in WAL mode writers go on meanwhile.
                connection.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            copy.close()
        os.replace(temporary, target)

    def restore(self, source: str) -> None:
        """Replace this database's content with the backup in the file ``source``."""
        original = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            version = original.execute("PRAGMA user_version").fetchone()[0]
            tables = {name for (name,) in original.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            # a backup of an older schema is upgraded once restored (schema 1: no feed)
            if not 1 <= version <= SCHEMA_VERSION or not {"flows", "flow_owners",
                                                          "flow_history"} <= tables:
                raise ValueError(f"{source} is not a flow-repository backup "
                                 f"(schema {version})")
            with self._using() as connection:
                original.backup(connection)
                self._create_schema(connection)
                # A generation no process has seen: totals they counted before are not
                # taken for this content (the backup may hold any number).
                connection.execute("UPDATE generations SET value = abs(random()) "
                                   "WHERE name = 'membership'")
        finally:
            original.close()

    def close(self) -> None:
        """Close every connection this object opened (the next use opens new ones)."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()
        with self._process_writers():
            if self._turn_file_descriptor is not None and self._turn_pid == os.getpid():
                os.close(self._turn_file_descriptor)
            self._turn_file_descriptor = self._turn_pid = None
        self._shared = self._writer = None
        self._local = threading.local()


def _raise_unavailable(error: sqlite3.Error) -> None:
    """Raise StoreUnavailable for an error that says the database is away or busy."""
    if getattr(error, "sqlite_errorcode", 0) & 0xFF in _UNAVAILABLE:
        raise StoreUnavailable(error, "SQLite") from error


class _Joined:
    """A block joining this thread's open write transaction (see Database.writing)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Connection:
        return self._connection

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, sqlite3.Error):
            _raise_unavailable(error)


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _document(row: Sequence[Any]) -> dict:
    """The flow of a row that starts with the columns of _ROW."""
    key, text, lease_until, lease_owner = row[:4]
    document = {"_id": _flow_id(key), **loads(text)}
    if lease_until is not None:
        document["relayLeaseUntil"] = from_millis(lease_until)
    if lease_owner is not None:
        document["relayLeaseOwner"] = lease_owner
    return document


_ROW = "id, doc, lease_until, lease_owner"


# ----------------------------------------------------------------------------- flows


class CountedTotals:
    """List totals this process counted, each kept with the membership generation it was
    counted at and given again only while that generation stands.

    A page's total is a count over every flow in the caller's scope: with a user's and a
    tenant's flows that is a union of two owner walks, thousands of rows, where the page
    itself reads ten. Only totals that depend on nothing but which flows exist and who owns
    them are kept (no filter on a flow's fields); any change to that moves the generation,
    whichever process makes it.
    """

    def __init__(self, capacity: int = COUNTED_TOTALS) -> None:
        self._capacity = capacity
        self._totals: collections.OrderedDict[tuple, tuple[int, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def count(self, connection: sqlite3.Connection, sql: str, parameters: Sequence[Any]) -> int:
        """The total ``sql`` counts, read in the snapshot of ``connection``'s transaction."""
        row = connection.execute(
            "SELECT value FROM generations WHERE name = 'membership'").fetchone()
        key = (sql, tuple(parameters))
        with self._lock:
            kept = self._totals.get(key)
            if row is not None and kept is not None and kept[0] == row[0]:
                self._totals.move_to_end(key)
                return kept[1]
        total = connection.execute(sql, parameters).fetchone()[0]
        if row is not None:
            with self._lock:
                self._totals[key] = (row[0], total)
                self._totals.move_to_end(key)
                while len(self._totals) > self._capacity:
                    self._totals.popitem(last=False)
        return total


class SharedDocuments:
    """The flows this process last read for readers that only read (a page, GET of one
    flow), decoded, each with the row it was decoded from.

    Such a read reads its rows anyway; a row read again unchanged (the same document text
    and lease) is given as the SharedDocument decoded the first time, with what readers
    derived from it (the flow's JSON text in an answer), instead of being decoded, projected
    and encoded again: that was two thirds of a page's own work. Past ``capacity`` flows or
    ``capacity_chars`` characters of their stored text (decoded, a flow takes about ten
    times its text's size), the oldest half is forgotten.
    """

    def __init__(self, capacity: int = SHARED_DOCUMENTS,
                 capacity_chars: int = SHARED_DOCUMENT_CHARS) -> None:
        self._capacity = capacity
        self._capacity_chars = capacity_chars
        self._kept: dict[bytes | str, tuple[tuple, SharedDocument]] = {}
        self._chars = 0
        self._lock = threading.Lock()

    def document(self, row: tuple) -> SharedDocument:
        """The shared document of ``row`` (id, doc, lease_until, lease_owner)."""
        kept = self._kept.get(row[0])
        if kept is not None and kept[0] == row:
            return kept[1]
        document = SharedDocument(_document(row))
        with self._lock:
            if len(self._kept) >= self._capacity or self._chars >= self._capacity_chars:
                for key in list(self._kept)[:max(1, len(self._kept) // 2)]:
                    self._chars -= len(self._kept.pop(key)[0][1])
            replaced = self._kept.pop(row[0], None)
            if replaced is not None:
                self._chars -= len(replaced[0][1])
            self._kept[row[0]] = (row, document)
            self._chars += len(row[1])
        return document


class SqliteFlowStore:
    """The Store contract on SQLite; see the module docstring for the layout."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._totals = CountedTotals()
        self._shared_documents = SharedDocuments()
        self.history = SqliteHistoryStore(database)
        self.changes = SqliteChangeFeed(database)

    @classmethod
    def open(cls, path: str) -> SqliteFlowStore:
        """A store on the database file ``path`` (or ``:memory:``), created if need be."""
        return cls(Database(path))

    # ------------------------------------------------------------------------- housekeeping

    def ensure_indexes(self) -> None:
        """Create the tables and indexes that are missing (idempotent)."""
        with self.database.writing() as connection:
            for name, (definition, _) in INDEXES.items():
                connection.execute(f"CREATE INDEX IF NOT EXISTS {name} {definition}")

    atomic_batches = True
    history_with_change = True

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """The writes made inside, in this thread, as one transaction: all or none, and
        one commit (a burst of status reports costs one, not one each)."""
        with self.database.writing():
            yield

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        self.database.query("SELECT count(*) FROM flows WHERE id = x''")

    # ------------------------------------------------------------------------- reads

    def get(self, flow_id: ObjectId, owner_ids: Sequence[str] | None = None, *,
            shared: bool = False) -> dict | None:
        """The live flow, if it exists and (when ``owner_ids`` is given) one of them owns it;
        ``shared``: a SharedDocument (see SharedDocuments), read only."""
        rows = self.database.query(
            f"SELECT {_ROW} FROM flows WHERE id = ? AND deleted IS NULL", (flow_key(flow_id),))
        if not rows:
            return None
        decode = self._shared_documents.document if shared else _document
        document = decode(rows[0])
        if owner_ids is not None and not owned_by_any(document, owner_ids):
            return None
        return document

    def list(self, query: ListQuery, owner_ids: Sequence[str] | None, *,
             fits: Fits | None = None) -> tuple[list[dict], int]:
        """One page of live flows matching ``query`` within the caller's scope, and the total.

        The page's documents are read a few at a time and no further than ``fits`` allows;
        they are SharedDocuments (see SharedDocuments), read only.
        """
        listing = _listing(query, owner_ids)
        if listing is None:
            return [], 0
        (count_sql, count_parameters), (page_sql, page_parameters) = listing.count, listing.page
        skip = (query.page_number - 1) * query.page_size
        with self.database.reading() as connection:
            if listing.by_membership:
                total = self._totals.count(connection, count_sql, count_parameters)
            else:
                total = connection.execute(count_sql, count_parameters).fetchone()[0]
            keys = [row[-1] for row in connection.execute(
                page_sql, (*page_parameters, query.page_size, skip))]

            def in_order() -> Iterator[dict]:
                for start in range(0, len(keys), READ_BATCH):
                    chunk = keys[start:start + READ_BATCH]
                    documents = self._documents(connection, chunk,
                                                self._shared_documents.document)
                    yield from (documents[key] for key in chunk if key in documents)

            return read_until(in_order(), fits), total

    @staticmethod
    def _documents(connection: sqlite3.Connection, keys: Sequence[bytes | str],
                   decode: Callable[[tuple], dict] = _document) -> dict[bytes | str, dict]:
        """The flows of ``keys`` by key, each row made a document by ``decode`` (default: a
        fresh one)."""
        if not keys:
            return {}
        rows = connection.execute(
            f"SELECT {_ROW} FROM flows WHERE id IN ({_marks(len(keys))})", list(keys))
        return {row[0]: decode(row) for row in rows}

    def stuck(self, status: str, changed_before: datetime, *, retries: int, limit: int = 100
              ) -> list[dict]:
        """Live flows in ``status`` since before ``changed_before``, re-sent ``retries`` times."""
        rows = self.database.query(
            f"SELECT {_ROW} FROM flows WHERE status = ? AND retries = ? AND changed < ? "
            "AND deleted IS NULL ORDER BY changed LIMIT ?",
            (status, retries, millis(changed_before), limit))
        return [_document(row) for row in rows]

    def owned_by(self, owner_id: str) -> list[ObjectId]:
        """Ids of every live flow that lists ``owner_id`` among its owners."""
        rows = self.database.query(
            "SELECT fid FROM flow_owners WHERE owner = ? ORDER BY created, fid", (owner_id,))
        return [_flow_id(key) for (key,) in rows]

    def count_by_status(self, statuses: Sequence[str]) -> dict[str, int]:
        """How many live flows are in each of ``statuses`` (one index count per status)."""
        with self.database.reading() as connection:
            return {status: connection.execute(
                "SELECT count(*) FROM flows WHERE status = ? AND deleted IS NULL",
                (status,)).fetchone()[0] for status in statuses}

    def outbox_backlog(self) -> tuple[int, datetime | None]:
        """How many events wait for the relay, and when the oldest of them was stored."""
        with self.database.reading() as connection:
            pending = connection.execute(
                "SELECT total(pending_count) FROM flows WHERE pending_at IS NOT NULL"
            ).fetchone()[0]
            first = connection.execute(
                "SELECT doc FROM flows WHERE pending_at IS NOT NULL ORDER BY pending_at, id "
                "LIMIT 1").fetchone()
        oldest = None if first is None else loads(first[0])["outbox"][0]["storedAt"]
        return int(pending), oldest

    # ------------------------------------------------------------------------- writes

    def insert(self, document: Mapping[str, Any]) -> dict:
        """Store a new flow (its pending events included) and return it as stored."""
        stored = stored_copy(document)
        stored.setdefault("_id", ObjectId())
        pending = pending_entries(stored)
        stored.pop("historyOutbox", None)
        body = {key: value for key, value in stored.items() if key != "_id"}
        # the relay lease lives in its own columns (values of other types stay in the body)
        lease_until = lease_owner = None
        if isinstance(body.get("relayLeaseUntil"), datetime):
            lease_until = millis(body.pop("relayLeaseUntil"))
        if isinstance(body.get("relayLeaseOwner"), str):
            lease_owner = body.pop("relayLeaseOwner")
        key = flow_key(stored["_id"])
        with self.database.writing() as connection:
            try:
                connection.execute(
                    f"INSERT INTO flows (id, doc, lease_until, lease_owner, {', '.join(COLUMNS)})"
                    f" VALUES ({_marks(4 + len(COLUMNS))})",
                    (key, dumps(body), lease_until, lease_owner, *_columns(body)))
            except sqlite3.IntegrityError:
                raise ValueError(f"a flow with id {stored['_id']} is already stored") from None
            self._list_owners(connection, key, body, replace=False)
            if pending:
                revision = stored.get("revision") or 1
                self.changes.write(connection, feed_entry(stored, pending[-1], revision))
                _record_history(connection, key, {**stored, "revision": revision}, pending)
        return stored

    @staticmethod
    def _list_owners(connection: sqlite3.Connection, key: bytes | str,
                     document: Mapping[str, Any], *, replace: bool = True,
                     previous: Sequence[Any] | None = None) -> None:
        """Keep the flow's owner rows in step with ``document`` (its owners and sort keys)."""
        owners = _owner_ids(document)
        sort_keys = (sort_key(document.get("name")), sort_key(document.get("createdAt")),
                     sort_key(document.get("updatedAt")))
        if replace and previous is not None and list(previous) == owners:
            if owners:
                connection.execute("UPDATE flow_owners SET name = ?, created = ?, updated = ? "
                                   "WHERE fid = ?", (*sort_keys, key))
            return
        if replace:
            connection.execute("DELETE FROM flow_owners WHERE fid = ?", (key,))
        connection.executemany(
            "INSERT OR IGNORE INTO flow_owners (fid, owner, name, created, updated) "
            "VALUES (?, ?, ?, ?, ?)", [(key, owner, *sort_keys) for owner in owners])

    @staticmethod
    def _rewrite(connection: sqlite3.Connection, key: bytes | str, document: Mapping[str, Any]
                 ) -> None:
        body = {name: value for name, value in document.items() if name not in (
            "_id", "relayLeaseUntil", "relayLeaseOwner")}
        connection.execute(
            f"UPDATE flows SET doc = ?, {', '.join(f'{c} = ?' for c in COLUMNS)} WHERE id = ?",
            (dumps(body), *_columns(body), key))

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

        With ``lease`` (relay id, until) the change also leases the flow to that relay when
        no relay holds a live lease, in the same transaction (see the MongoDB store).

        The preconditions are checked and the change written in one IMMEDIATE transaction,
        which holds the database's write lock from the read on: nothing can change the flow
        in between. The revision goes up by one, and the change's events and its ``history``
        entry join the outbox and the history outbox in the same commit. Returns the flow
        as changed, or only its ``_id`` and the ``returning`` fields when they are given.
        """
        key = flow_key(flow_id)
        fields = stored_copy(changes or {})
        # a change may name its own time (so that its history entry carries the same one)
        if "updatedAt" not in fields:
            fields["updatedAt"] = utcnow()
        with self.database.writing() as connection:
            if returning is not None and not events and remove_owner is None \
                    and owner_ids is None and owner_count is None \
                    and fields.keys() <= STATUS_FIELDS.keys():
                written = self._set_status(connection, flow_id, key, fields, history,
                                           statuses, revision)
                if written is not None:
                    return {name: written[name] for name in ("_id", *returning)
                            if name in written}
            row = connection.execute(
                f"SELECT {_ROW}, status, revision FROM flows WHERE id = ? AND deleted IS NULL",
                (key,)).fetchone()
            if row is None:
                return None
            status, current_revision = row[4], row[5]
            if statuses is not None and status not in statuses:
                return None
            if isinstance(revision, int):
                if current_revision != revision:
                    return None
            elif revision is not None and current_revision not in revision:
                return None
            current = _document(row)
            owners = current.get("owners")
            if owner_ids is not None and not owned_by_any(current, owner_ids):
                return None
            if owner_count is not None and not (isinstance(owners, list)
                                                and len(owners) == owner_count):
                return None
            previous_owners = _owner_ids(current)
            # entries an earlier version of this store left pending go in with this one
            entries = [*pending_entries(current), stored_copy(history)]
            current.pop("historyOutbox", None)
            updated = {**current, **fields}
            updated["revision"] = (current.get("revision") or 0) + 1
            if events:
                updated["outbox"] = [*current.get("outbox", []), *stored_copy(list(events))]
            if remove_owner is not None and isinstance(owners, list):
                updated["owners"] = [owner for owner in owners if not (
                    isinstance(owner, Mapping) and owner.get("id") == remove_owner)]
            self._rewrite(connection, key, updated)
            self._list_owners(connection, key, updated, previous=previous_owners)
            self.changes.write(connection, feed_entry(updated, history, updated["revision"]))
            _record_history(connection, key, updated, entries)
            # the lease is for the relay, which has nothing to do for a change without events
            if lease is not None and events and (row[2] is None or row[2] < millis(utcnow())):
                updated["relayLeaseOwner"], updated["relayLeaseUntil"] = lease
                connection.execute("UPDATE flows SET lease_until = ?, lease_owner = ? "
                                   "WHERE id = ?", (millis(lease[1]), lease[0], key))
        if returning is not None:
            return {name: updated[name] for name in ("_id", *returning) if name in updated}
        return updated

    def _set_status(self, connection: sqlite3.Connection, flow_id: ObjectId, key: bytes | str,
                    fields: Mapping[str, Any], history: Mapping[str, Any],
                    statuses: Sequence[str] | None, revision: int | Sequence[int] | None,
                    ) -> dict | None:
        """A status change written in place: SQLite sets the fields in the stored JSON, so
        the document is neither read back nor rewritten here. None when the flow is not
        there as the preconditions want it, or is not plain enough for this (its revision
        not a number, history entries an earlier layout left pending in it): the caller's
        general path then decides and writes."""
        paths, values, columns, column_values = [], [], ["revision = revision + 1"], []
        for field, value in fields.items():
            if type(value) in (str, int) or value is None:  # as JSON has them
                paths.append(f"'$.{field}', ?")
                values.append(value)
            elif isinstance(value, datetime):  # tagged by SQLite: no encoder call
                paths.append(f"'$.{field}', json_object('{_DATE}', ?)")
                values.append(millis(value))
            else:
                paths.append(f"'$.{field}', json(?)")
                values.append(dumps(value))
            if STATUS_FIELDS[field] is not None:
                column, derive = STATUS_FIELDS[field]
                columns.append(f"{column} = ?")
                column_values.append(derive(value))
        conditions, condition_values = ["revision IS NOT NULL"], []
        if statuses is not None:
            conditions.append(f"status IN ({_marks(len(statuses))})")
            condition_values += statuses
        if isinstance(revision, int):
            conditions.append("revision = ?")
            condition_values.append(revision)
        elif revision is not None:
            conditions.append(f"revision IN ({_marks(len(revision))})")
            condition_values += revision
        row = connection.execute(
            f"UPDATE flows SET doc = json_set(doc, {', '.join(paths)}, '$.revision', "
            f"revision + 1), {', '.join(columns)} WHERE id = ? AND deleted IS NULL "
            f"AND {' AND '.join(conditions)} AND json_type(doc, '$.historyOutbox') IS NULL "
            "RETURNING revision, json_extract(doc, '$.owners', '$.type', '$.fromTemplate')",
            (*values, *column_values, key, *condition_values)).fetchone()
        if row is None:
            return None
        owners, kind, template = loads(row[1])
        flow = {"_id": flow_id, "revision": row[0], **fields, "owners": owners, "type": kind,
                "fromTemplate": template}
        connection.execute("UPDATE flow_owners SET updated = ? WHERE fid = ?",
                           (sort_key(fields["updatedAt"]), key))
        entry = stored_copy(history)
        self.changes.write(connection, feed_entry(flow, entry, flow["revision"]))
        _record_history(connection, key, flow, [entry])
        return flow

    def _change_document(self, flow_id: ObjectId, change: Callable[[dict], bool]) -> None:
        """Read, change and write back one flow's document in one transaction (``change``
        edits it in place and says whether anything changed)."""
        key = flow_key(flow_id)
        with self.database.writing() as connection:
            row = connection.execute(f"SELECT {_ROW} FROM flows WHERE id = ?", (key,)).fetchone()
            if row is None:
                return
            document = _document(row)
            if change(document):
                self._rewrite(connection, key, document)

    def record_history(self, flows: Sequence[Mapping[str, Any]],
                       entries: Sequence[Mapping[str, Any]]) -> None:
        """Write ``entries`` into the history (their feed rows went in with their changes)."""
        self.history.record(entries)

    def drop_pending_history(self, flow_id: ObjectId, entry_ids: Sequence[str]) -> None:
        """Remove pending history entries once they are written to the history."""
        self._change_document(flow_id, lambda document: _drop_items(
            document, "historyOutbox", "entryId", entry_ids))

    # ------------------------------------------------------------------------- outbox relay

    _CLAIMABLE = ("SELECT id FROM flows WHERE pending_at IS NOT NULL "
                  "AND (lease_until IS NULL OR lease_until < ?) ORDER BY pending_at, id LIMIT ?")

    def pending_flows(self, limit: int) -> list[ObjectId]:
        """Ids of flows with events waiting and no live lease, oldest waiting event first."""
        rows = self.database.query(self._CLAIMABLE, (millis(utcnow()), limit))
        return [_flow_id(key) for (key,) in rows]

    def unrecorded(self, before: datetime, limit: int) -> list[dict]:
        """Up to ``limit`` live flows whose history entries have been pending since before
        ``before`` and that no relay holds a live lease on: left by a writer that died
        before recording them. Oldest first."""
        rows = self.database.query(
            f"SELECT {_ROW} FROM flows WHERE history_at IS NOT NULL AND history_at < ? "
            "AND (lease_until IS NULL OR lease_until < ?) ORDER BY history_at, id LIMIT ?",
            (millis(before), millis(utcnow()), limit))
        return [_document(row) for row in rows]

    def claim_batch(self, relay_id: str, until: datetime, limit: int,
                    flow_ids: Sequence[ObjectId] | None = None) -> list[dict]:
        """Lease up to ``limit`` claimable flows to ``relay_id`` until ``until`` at once,
        oldest waiting first (or those of ``flow_ids`` that are claimable, in that order).

        The candidates are read, leased and read back in one write transaction, so no other
        relay can take one of them in between; when nothing is pending, no write lock is
        taken at all."""
        now = utcnow()
        if flow_ids is None:
            if not self.database.query(self._CLAIMABLE, (millis(now), 1)):
                return []
            claimable, parameters = self._CLAIMABLE, (millis(now), limit)
        else:
            wanted = [flow_key(flow_id) for flow_id in flow_ids][:limit]
            if not wanted:
                return []
            claimable = (f"SELECT id FROM flows WHERE id IN ({_marks(len(wanted))}) "
                         "AND pending_at IS NOT NULL AND (lease_until IS NULL OR lease_until < ?)")
            parameters = (*wanted, millis(now))
        with self.database.writing() as connection:
            keys = [key for (key,) in connection.execute(claimable, parameters)]
            if not keys:
                return []
            connection.execute(
                f"UPDATE flows SET lease_until = ?, lease_owner = ? "
                f"WHERE id IN ({_marks(len(keys))})", (millis(until), relay_id, *keys))
            documents = self._documents(connection, keys)
        return [documents[key] for key in keys]

    def finish_batch(self, relay_id: str, *, published: Mapping[ObjectId, Sequence[str]],
                     recorded: Mapping[ObjectId, Sequence[str]] | None = None,
                     deleted: Sequence[ObjectId] = ()) -> None:
        """What a relay does after a batch, in one transaction: drop the confirmed events
        of the flows it leased and give the leases back (unless a lease went to another
        relay meanwhile), drop recorded pending history entries, and remove the ``deleted``
        tombstones whose events are now all out, their history with them."""
        recorded = recorded or {}
        flow_ids = list(dict.fromkeys([*published, *recorded]))
        if not flow_ids:
            return
        with self.database.writing() as connection:
            # Most flows give up every pending item at once: SQLite empties the list in the
            # stored JSON itself; only the others are decoded and rewritten here.
            rest = [flow_key(flow_id) for flow_id in flow_ids if not self._emptied(
                connection, flow_id, relay_id, published.get(flow_id, ()),
                recorded.get(flow_id, ()))]
            rows = connection.execute(
                f"SELECT {_ROW} FROM flows WHERE id IN ({_marks(len(rest))})",
                rest).fetchall() if rest else []
            for row in rows:
                document = _document(row)
                flow_id = document["_id"]
                changed = _drop_items(document, "historyOutbox", "entryId",
                                      recorded.get(flow_id, ()))
                if flow_id in published and row[3] == relay_id:
                    changed = _drop_items(document, "outbox", "eventId",
                                          published[flow_id]) or changed
                if changed:
                    self._rewrite(connection, row[0], document)
            for flow_id in deleted:
                key = flow_key(flow_id)
                removed = connection.execute(
                    "DELETE FROM flows WHERE id = ? AND deleted = 1 AND lease_owner = ? "
                    "AND COALESCE(pending_count, 0) = 0", (key, relay_id)).rowcount
                if removed:
                    connection.execute("DELETE FROM flow_owners WHERE fid = ?", (key,))
                    connection.execute("DELETE FROM flow_history WHERE fid = ?", (key,))
            leased = [flow_key(flow_id) for flow_id in published]
            if leased:
                connection.execute(
                    f"UPDATE flows SET lease_until = NULL, lease_owner = NULL "
                    f"WHERE id IN ({_marks(len(leased))}) AND lease_owner = ?",
                    (*leased, relay_id))

    @staticmethod
    def _emptied(connection: sqlite3.Connection, flow_id: ObjectId, relay_id: str,
                 event_ids: Sequence[str], entry_ids: Sequence[str]) -> bool:
        """Empty the flow's history outbox (of ``entry_ids``) and, while ``relay_id`` holds
        its lease, its outbox (of ``event_ids``) in place when every item in them is among
        those done; False when some item stays, which the caller then drops item by item."""
        key = flow_key(flow_id)
        if entry_ids and not connection.execute(
                _EMPTY_WHEN_DONE.format(field="historyOutbox", key="entryId",
                                        pending=", history_at = NULL",
                                        lease="", marks=_marks(len(entry_ids))),
                (key, *entry_ids)).rowcount:
            return False
        return not event_ids or bool(connection.execute(
            _EMPTY_WHEN_DONE.format(field="outbox", key="eventId",
                                    pending=", pending_at = NULL, pending_count = 0",
                                    lease="AND lease_owner = ? ", marks=_marks(len(event_ids))),
            (key, relay_id, *event_ids)).rowcount)

    # ------------------------------------------------------------------------- test support

    def raw(self, flow_id: ObjectId) -> dict | None:
        """The document with its internal fields, keys escaped as MongoDB would store them
        (tests compare backends through it; this store keeps keys verbatim)."""
        rows = self.database.query(f"SELECT {_ROW} FROM flows WHERE id = ?",
                                   (flow_key(flow_id),))
        return encode_keys(_document(rows[0])) if rows else None

    def drop_all(self) -> None:
        """Remove every flow and every history entry."""
        with self.database.writing() as connection:
            for table in ("flows", "flow_owners", "flow_history", "flow_changes", "feed_state"):
                connection.execute(f"DELETE FROM {table}")

    def backup(self, target: str) -> None:
        """Copy the whole store, while it is in use, into the file ``target``."""
        self.database.backup(target)

    def restore(self, source: str) -> None:
        """Replace the whole store with the backup in ``source`` (ValueError if it is none)."""
        self.database.restore(source)

    def close(self) -> None:
        """Close this process's connections (the CLI's backup and restore)."""
        self.database.close()


# Empties a list of the document when each of its items is one of those given by ``key``.
_EMPTY_WHEN_DONE = (
    "UPDATE flows SET doc = json_set(doc, '$.{field}', json('[]')){pending} "
    "WHERE id = ? {lease}AND json_type(doc, '$.{field}') = 'array' AND NOT EXISTS ("
    "SELECT 1 FROM json_each(flows.doc, '$.{field}') "
    "WHERE json_extract(value, '$.{key}') IS NULL "
    "OR json_extract(value, '$.{key}') NOT IN ({marks}))")


def _record_history(connection: sqlite3.Connection, key: bytes | str,
                    flow: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> None:
    """Write the history ``entries`` of ``flow``, the last one at its revision, in the
    transaction of the change that made it (entries an earlier version of this store left
    pending in the flow, as the MongoDB store does, come first)."""
    SqliteHistoryStore.write(connection, [(key, entry)
                                          for entry in recorded_entries(flow, entries)])


def _drop_items(document: dict, field: str, key: str, values: Iterable[Any]) -> bool:
    items = document.get(field)
    if not isinstance(items, list):
        return False
    wanted = set(values)
    kept = [item for item in items if not (isinstance(item, Mapping) and item.get(key) in wanted)]
    document[field] = kept
    return len(kept) != len(items)


class _Listing(NamedTuple):
    """GET /flows as SQL: the count and the page (without its LIMIT and OFFSET values)."""

    count: tuple[str, list]
    page: tuple[str, list]
    by_membership: bool  # the count reads no field of a flow: CountedTotals may keep it


def _listing(query: ListQuery, owner_ids: Sequence[str] | None) -> _Listing | None:
    """GET /flows as SQL; None when the scope holds nobody.

    Owner-scoped (or filter[user]) lists walk the owner index in the requested order, one
    walk per owner id, merged by SQLite (a compound SELECT ordered like its parts), so a
    page costs its offset plus its size, not the number of flows owned. Other filters are
    checked on the flow each index entry points to, as MongoDB's plan does.
    """
    column = SORT_COLUMNS[query.sort_field]
    order = "DESC" if query.sort_descending else "ASC"
    conditions: list[str] = []
    parameters: list[Any] = []
    for name, value in (("status", query.status), ("type", query.type),
                        ("template", query.from_template)):
        if value:
            conditions.append(f"f.{name} = ?")
            parameters.append(value)
    if query.search:
        term = search_term(query.search)
        conditions.append("(instr(f.search_name, ?) > 0 OR instr(f.search_description, ?) > 0)")
        parameters += [term, term]
    if owner_ids is None and not query.user:
        where = " AND ".join(["f.deleted IS NULL", *conditions])
        return _Listing((f"SELECT count(*) FROM flows f WHERE {where}", parameters),
                        ((f"SELECT f.id FROM flows f WHERE {where} "
                          f"ORDER BY f.{column} {order}, f.id {order} LIMIT ? OFFSET ?"),
                         parameters), not conditions)
    scope: list[Any] = [] if owner_ids is None else list(dict.fromkeys(owner_ids))
    if owner_ids is not None and not scope:
        return None
    within: list[str] = []
    if query.user:
        drivers = [query.user]
        if owner_ids is not None:  # filter[user] narrows within the scope, never widens it
            within.append(f"EXISTS (SELECT 1 FROM flow_owners s WHERE s.fid = o.fid "
                          f"AND s.owner IN ({_marks(len(scope))}))")
    else:
        drivers, scope = scope, []
    # CROSS JOIN: the owner index drives (it gives the order), each flow is looked up by id
    join = " CROSS JOIN flows f ON f.id = o.fid" if conditions else ""
    where = " AND ".join(["o.owner = ?", *within, *conditions])
    arm_parameters = [*scope, *parameters]
    ids = f"SELECT o.fid FROM flow_owners o{join} WHERE {where}"
    keyed = f"SELECT o.{column} AS k, o.fid AS fid FROM flow_owners o{join} WHERE {where}"
    every: list[Any] = []
    for driver in drivers:
        every += [driver, *arm_parameters]
    if len(drivers) == 1:
        count = f"SELECT count(*) FROM flow_owners o{join} WHERE {where}"
    else:
        count = f"SELECT count(*) FROM ({' UNION '.join([ids] * len(drivers))})"
    page = (" UNION ".join([keyed] * len(drivers))
            + f" ORDER BY k {order}, fid {order} LIMIT ? OFFSET ?")
    return _Listing((count, every), (page, every), not conditions)


# ----------------------------------------------------------------------------- history


class SqliteHistoryStore:
    """History entries in the ``flow_history`` table, one per (flow id, revision).

    Writes are idempotent: an entry is inserted only if its key is free, so writing the
    same pending entry twice (a retry, two relays) leaves the first one.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def ensure_indexes(self) -> None:
        """Nothing to create: the primary key (flow, revision) serves every read."""

    def record(self, entries: Sequence[Mapping[str, Any]]) -> None:
        if not entries:
            return
        with self._database.writing() as connection:
            self.write(connection, [(flow_key(entry["flowId"]), entry) for entry in entries])

    @staticmethod
    def write(connection: sqlite3.Connection,
              entries: Sequence[tuple[bytes | str, Mapping[str, Any]]]) -> None:
        """Insert (flow key, entry) pairs in ``connection``'s transaction, keeping any
        entry already written at the same revision."""
        connection.executemany(
            "INSERT OR IGNORE INTO flow_history (fid, revision, kind, entry) VALUES (?, ?, ?, ?)",
            [(key, entry["revision"], entry.get("kind"), dumps(entry)) for key, entry in entries])

    def page(self, flow_id: ObjectId, page_number: int, page_size: int, *,
             fits: Fits | None = None) -> tuple[list[dict], int]:
        """Newest first; rows are read one at a time, no further than ``fits`` allows."""
        key = flow_key(flow_id)
        with self._database.reading() as connection:
            total = connection.execute("SELECT count(*) FROM flow_history WHERE fid = ?",
                                       (key,)).fetchone()[0]
            rows = connection.execute(
                "SELECT entry FROM flow_history WHERE fid = ? ORDER BY revision DESC "
                "LIMIT ? OFFSET ?", (key, page_size, (page_number - 1) * page_size))
            return read_until((loads(entry) for (entry,) in rows), fits), total

    def get(self, flow_id: ObjectId, revision: int) -> dict | None:
        rows = self._database.query(
            "SELECT entry FROM flow_history WHERE fid = ? AND revision = ?",
            (flow_key(flow_id), revision))
        return loads(rows[0][0]) if rows else None

    def definition_at(self, flow_id: ObjectId, revision: int) -> dict | None:
        """The newest definition entry at or before ``revision``: the flow then in force."""
        rows = self._database.query(
            "SELECT entry FROM flow_history WHERE fid = ? AND revision <= ? "
            "AND kind = 'definition' ORDER BY revision DESC LIMIT 1",
            (flow_key(flow_id), revision))
        return loads(rows[0][0]) if rows else None

    def trim(self, flow_id: ObjectId, below_revision: int) -> None:
        with self._database.writing() as connection:
            connection.execute("DELETE FROM flow_history WHERE fid = ? AND revision < ?",
                               (flow_key(flow_id), below_revision))

    def drop(self, flow_id: ObjectId) -> None:
        self.drop_flows([flow_id])

    def drop_flows(self, flow_ids: Sequence[ObjectId]) -> None:
        with self._database.writing() as connection:
            connection.executemany("DELETE FROM flow_history WHERE fid = ?",
                                   [(flow_key(flow_id),) for flow_id in flow_ids])

    def pseudonymise(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> int:
        key = flow_key(flow_id)
        changed = 0
        with self._database.writing() as connection:
            rows = connection.execute(
                "SELECT revision, entry FROM flow_history WHERE fid = ?", (key,)).fetchall()
            for revision, text in rows:
                replacement = pseudonymised(loads(text), real_id, pseudonym)
                if replacement is not None:
                    connection.execute(
                        "UPDATE flow_history SET entry = ? WHERE fid = ? AND revision = ?",
                        (dumps(replacement), key, revision))
                    changed += 1
        return changed

    def drop_all(self) -> None:
        with self._database.writing() as connection:
            connection.execute("DELETE FROM flow_history")


# ----------------------------------------------------------------------------- change feed

_HOLE = '{"hole":true}'


class SqliteChangeFeed:
    """The change feed in the ``flow_changes`` table (see SCHEMA for why it has no gaps).

    A change's row is written by the store's own write transaction (:meth:`write`), so the
    feed needs nothing from the relay: :meth:`record` has nothing to do here.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def ensure_indexes(self) -> None:
        """Nothing to create: the schema holds the table and its indexes."""

    @staticmethod
    def write(connection: sqlite3.Connection, entry: Mapping[str, Any]) -> None:
        """Append one change, inside the caller's write transaction."""
        connection.execute(
            "INSERT INTO flow_changes (fid, revision, at, entry) VALUES (?, ?, ?, ?)",
            (flow_key(entry["flowId"]), entry["revision"], millis(entry["at"]), dumps(entry)))

    def record(self, flows: Sequence[Mapping[str, Any]]) -> None:
        """Nothing: every change was written with the change itself."""

    def after(self, seq: int, limit: int) -> list[dict]:
        """Up to ``limit`` changes (and holes) after ``seq``, in seq order."""
        rows = self._database.query(
            "SELECT seq, entry FROM flow_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit))
        return [{**loads(entry), "seq": number} for number, entry in rows]

    def newest(self) -> int:
        """The largest seq the feed holds (or last trimmed)."""
        rows = self._database.query("SELECT max(seq) FROM flow_changes")
        return rows[0][0] if rows and rows[0][0] is not None else self.trimmed_through()

    def allocated(self) -> int:
        """The largest seq ever handed out: the newest, as a number is committed with its
        change and rows only ever leave from the oldest end."""
        return self.newest()

    def trimmed_through(self) -> int:
        rows = self._database.query("SELECT value FROM feed_state WHERE name = 'trimmed'")
        return rows[0][0] if rows else 0

    def abandon(self, seq: int) -> None:
        """Make ``seq`` a hole unless a change holds it (never below the trimmed mark)."""
        with self._database.writing() as connection:
            trimmed = connection.execute(
                "SELECT value FROM feed_state WHERE name = 'trimmed'").fetchone()
            if trimmed is None or seq > trimmed[0]:
                connection.execute(
                    "INSERT OR IGNORE INTO flow_changes (seq, fid, revision, at, entry) "
                    "VALUES (?, NULL, NULL, ?, ?)", (seq, millis(utcnow()), _HOLE))

    def trim(self, before: datetime) -> int:
        """Remove the changes older than ``before`` (up to the newest of them, by seq) and
        raise the trimmed mark with them, in one transaction; returns the mark."""
        with self._database.writing() as connection:
            found = connection.execute(
                "SELECT seq FROM flow_changes WHERE at < ? ORDER BY at DESC LIMIT 1",
                (millis(before),)).fetchone()
            if found is None:
                row = connection.execute(
                    "SELECT value FROM feed_state WHERE name = 'trimmed'").fetchone()
                return row[0] if row else 0
            connection.execute(
                "INSERT INTO feed_state (name, value) VALUES ('trimmed', ?) ON CONFLICT(name) "
                "DO UPDATE SET value = max(value, excluded.value)", (found[0],))
            connection.execute("DELETE FROM flow_changes WHERE seq <= ?", (found[0],))
            return connection.execute(
                "SELECT value FROM feed_state WHERE name = 'trimmed'").fetchone()[0]

    def forget_owner(self, flow_id: ObjectId, real_id: str, pseudonym: str) -> None:
        """Replace a deleted owner's id in the flow's changes."""
        key = flow_key(flow_id)
        with self._database.writing() as connection:
            rows = connection.execute("SELECT seq, entry FROM flow_changes WHERE fid = ?",
                                      (key,)).fetchall()
            for seq, text in rows:
                entry = loads(text)
                if real_id in entry.get("owners", []):
                    entry["owners"] = [pseudonym if owner == real_id else owner
                                       for owner in entry["owners"]]
                    connection.execute("UPDATE flow_changes SET entry = ? WHERE seq = ?",
                                       (dumps(entry), seq))
