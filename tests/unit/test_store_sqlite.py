"""The embedded SQLite store: index-backed statements (EXPLAIN QUERY PLAN), its location,
what it keeps across reopening, its JSON encoding, and backup and restore under load."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow_repository.adapters.store import SqliteFlowStore, utcnow
from flow_repository.adapters.store.base import SharedDocument
from flow_repository.adapters.store.sqlite import (
    SharedDocuments,
    SqliteHistoryStore,
    dumps,
    flow_key,
    loads,
)
from flow_repository.domain.flow import STATUSES, ListQuery
from flow_repository.entrypoints.cli import main
from flow_repository.settings import Settings

MOMENT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
ENTRY = {"entryId": "h1", "kind": "definition", "change": "updated", "at": MOMENT}


def document(owners: tuple[str, ...] = ("alice", "acme"), **fields: Any) -> dict[str, Any]:
    return {"_id": ObjectId(), "name": "flow", "description": "d", "type": "ordinary",
            "status": "inactive", "statusRetries": 0, "statusChangedAt": MOMENT,
            "owners": [{"id": owner, "type": "user"} for owner in owners], "revision": 1,
            "createdAt": MOMENT, "updatedAt": MOMENT, "fromTemplate": "1" * 24, "outbox": [],
            **fields}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFlowStore]:
    opened = SqliteFlowStore.open(str(tmp_path / "flows.sqlite3"))
    opened.ensure_indexes()
    yield opened
    opened.close()


# ----------------------------------------------------------------------------- query plans

FILTERS = [{}, {"status": "active"}, {"type": "realtime"}, {"user": "alice"},
           {"from_template": "1" * 24}, {"search": "fl.*"},
           {"status": "inactive", "user": "acme", "type": "ordinary", "search": "F"}]
SCOPES = [("alice", "acme"), ("bob",), None]
FULL_SCAN = re.compile(r"^SCAN (\w+)$")  # "SCAN t USING INDEX i" walks an index: allowed


def steady_state(store: SqliteFlowStore) -> None:
    """Every query the service makes while it runs, once each, on a seeded store."""
    flows = [store.insert(document(owners=(("alice", "acme"), ("bob",))[number % 2],
                                   name=f"n{number}", status=STATUSES[number % 4]))
             for number in range(40)]
    flow_id = flows[0]["_id"]
    for query_options in FILTERS:
        for field in ("createdAt", "updatedAt", "name"):
            for descending in (False, True):
                query = ListQuery(**query_options, sort_field=field, sort_descending=descending,
                                  page_number=2, page_size=5)
                for scope in SCOPES:
                    store.list(query, scope)
    store.get(flow_id)
    store.get(flow_id, ("alice",))
    store.update(flow_id, owner_ids=("alice",), owner_count=2, statuses=("inactive",),
                 revision=1, changes={"name": "x"}, remove_owner="acme",
                 events=[{"eventId": "e1", "storedAt": utcnow()}], history=ENTRY,
                 returning=("status",))
    store.update(flow_id, revision=(2, 3), history=ENTRY)
    store.update(flows[1]["_id"], statuses=("active",), revision=1, returning=("status",),
                 changes={"status": "starting", "statusChangedAt": utcnow()}, history=ENTRY)
    store.owned_by("alice")
    store.stuck("starting", MOMENT, retries=0)
    store.count_by_status(STATUSES)
    store.outbox_backlog()
    store.pending_flows(10)
    store.unrecorded(utcnow(), 10)
    [claimed] = store.claim_batch("relay-a", utcnow() + timedelta(seconds=30), 10)
    store.claim_batch("relay-a", utcnow() + timedelta(seconds=30), 10, [flow_id])
    store.drop_pending_history(flow_id, ["h1"])
    store.finish_batch("relay-a", published={flow_id: ["e1"]}, recorded={flow_id: ["h1"]},
                       deleted=[flow_id])
    store.history.record([{"flowId": flow_id, "revision": 2, **ENTRY}])
    store.history.page(flow_id, 1, 10)
    store.history.get(flow_id, 2)
    store.history.definition_at(flow_id, 3)
    store.history.trim(flow_id, 2)
    store.history.pseudonymise(flow_id, "alice", "someone")
    store.update(flow_id, changes={"deletedAt": MOMENT}, history=ENTRY,
                 lease=("relay-a", utcnow() + timedelta(seconds=30)))
    store.history.drop_flows([flow_id])
    store.finish_batch("relay-a", published={flow_id: []}, deleted=[flow_id])
    store.history.drop(flow_id)
    store.changes.after(0, 10)
    store.changes.newest()
    store.changes.allocated()
    store.changes.trimmed_through()
    store.changes.abandon(10_000)
    store.changes.trim(MOMENT)
    store.changes.trim(utcnow() + timedelta(seconds=1))
    store.changes.forget_owner(flow_id, "alice", "someone")
    assert claimed["_id"] == flow_id


def test_every_steady_state_statement_reads_an_index(store: SqliteFlowStore) -> None:
    statements: list[str] = []
    store.database.trace(statements.append)
    steady_state(store)
    store.database.trace(None)
    checked = 0
    for statement in dict.fromkeys(statements):
        if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            continue  # BEGIN, COMMIT, PRAGMA and INSERT read no table
        plan = [detail for *_, detail in store.database.query(
            f"EXPLAIN QUERY PLAN {statement}")]
        checked += 1
        assert not [line for line in plan if FULL_SCAN.match(line)], (statement, plan)
        if "ORDER BY k" in statement and "JOIN" not in statement:
            # an owner-scoped page is read in order from the owner index: no sorting
            assert not [line for line in plan if "TEMP B-TREE" in line], (statement, plan)
    assert checked > 100


def test_a_full_scan_would_be_noticed(store: SqliteFlowStore) -> None:
    plan = [detail for *_, detail in store.database.query(
        "EXPLAIN QUERY PLAN SELECT id FROM flows WHERE doc LIKE '%x%'")]
    assert [line for line in plan if FULL_SCAN.match(line)], plan


# ----------------------------------------------------------------------------- location


def test_the_default_database_is_under_the_state_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert Settings.from_env({}).embedded_database == str(
        tmp_path / "state" / "flow-repository" / "flows.sqlite3")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings.from_env({}).embedded_database == str(
        tmp_path / "home" / ".local" / "state" / "flow-repository" / "flows.sqlite3")


def test_embedded_db_path_chooses_the_file_or_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({"EMBEDDED_DB_PATH": "~/data/f.db"}).embedded_database == str(
        tmp_path / "data" / "f.db")
    assert Settings.from_env({"EMBEDDED_DB_PATH": ":memory:"}).embedded_database == ":memory:"


def test_a_file_keeps_the_data_across_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "er" / "flows.sqlite3")
    first = SqliteFlowStore.open(path)
    flow = first.insert(document())
    first.update(flow["_id"], changes={"name": "kept"}, history=ENTRY)
    first.close()
    again = SqliteFlowStore.open(path)
    assert again.get(flow["_id"])["name"] == "kept"
    assert "historyOutbox" not in again.raw(flow["_id"])  # written with the change
    assert again.history.get(flow["_id"], 2)["change"] == "updated"
    assert (Path(path).parent.stat().st_mode & 0o077) == 0  # the user's own directory
    again.close()


def test_entries_an_earlier_layout_left_pending_are_recorded_with_the_next_change(
        store: SqliteFlowStore) -> None:
    # files written before history went in with its change hold entries in the flow
    flow_id = store.insert(document(revision=3))["_id"]
    left = [{**ENTRY, "entryId": "r2"}, {**ENTRY, "entryId": "r3"}]
    store._change_document(flow_id, lambda flow: flow.update(historyOutbox=left) or True)
    store.finish_batch("relay-a", published={}, recorded={flow_id: ["r2"]})
    assert [entry["entryId"] for entry in store.raw(flow_id)["historyOutbox"]] == ["r3"]
    store.update(flow_id, changes={"name": "next"}, history={**ENTRY, "entryId": "r4"})
    assert "historyOutbox" not in store.raw(flow_id)
    assert [(revision, store.history.get(flow_id, revision)["entryId"])
            for revision in (3, 4)] == [(3, "r3"), (4, "r4")]


def test_a_change_whose_history_entry_cannot_be_written_is_not_applied(
        store: SqliteFlowStore, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = store.insert(document(outbox=[]))

    def disk_full(connection: Any, entries: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SqliteHistoryStore, "write", staticmethod(disk_full))
    with pytest.raises(sqlite3.OperationalError):
        store.update(flow["_id"], changes={"name": "lost"}, events=[{"eventId": "e"}],
                     history=ENTRY)
    monkeypatch.undo()
    assert store.raw(flow["_id"]) == {**flow, "outbox": []}  # neither change nor event
    assert store.history.get(flow["_id"], 2) is None
    assert store.update(flow["_id"], changes={"name": "kept"}, history=ENTRY)["revision"] == 2
    assert store.history.get(flow["_id"], 2)["change"] == "updated"


STARTED = {"status": "active", "statusChangedAt": MOMENT + timedelta(seconds=3),
           "statusReason": "orchestrator reported started", "statusRetries": 0,
           "updatedAt": MOMENT + timedelta(seconds=3)}


def test_a_status_change_written_in_place_stores_what_the_general_path_stores(
        store: SqliteFlowStore) -> None:
    # returning=... lets a status change be set in the stored JSON in place; without it,
    # the general path reads the document, changes it and writes it back
    twins = [store.insert(document(status="starting", name=f"twin {n}", revision=4))["_id"]
             for n in (0, 1)]
    store.insert(document(status="starting", name="other"))
    statements: list[str] = []
    store.database.trace(statements.append)
    in_place = store.update(twins[0], statuses=("starting",), revision=(4, 9),
                            changes=STARTED, history=ENTRY, returning=("status", "owners"))
    store.database.trace(None)
    assert any("json_set" in statement for statement in statements)
    assert not any(statement.startswith("SELECT") for statement in statements)
    general = store.update(twins[1], statuses=("starting",), revision=(4, 9),
                           changes=STARTED, history=ENTRY)
    assert in_place == {name: general[name] for name in ("status", "owners")} | {
        "_id": twins[0]}
    first, second = (store.raw(flow_id) for flow_id in twins)
    assert {**first, "_id": None, "name": None} == {**second, "_id": None, "name": None}
    assert first["revision"] == 5 and first["statusChangedAt"] == STARTED["statusChangedAt"]
    assert [store.history.get(flow_id, 5)["change"] for flow_id in twins] == ["updated"] * 2
    records = store.changes.after(0, 100)[-2:]
    assert [(record["flowId"], record["revision"], record["status"], record["owners"])
            for record in records] == [(flow_id, 5, "active", ["alice", "acme"])
                                       for flow_id in twins]
    rows = store.database.query("SELECT status, retries, changed, updated, revision FROM flows "
                                "WHERE id IN (?, ?)", [flow_key(flow_id) for flow_id in twins])
    assert rows[0] == rows[1]
    owner_rows = store.database.query(
        "SELECT fid, updated FROM flow_owners WHERE owner = 'alice' ORDER BY updated DESC")
    assert {fid for fid, _ in owner_rows[:2]} == {flow_key(flow_id) for flow_id in twins}
    assert store.stuck("starting", utcnow(), retries=0)[0]["name"] == "other"
    assert store.count_by_status(("active", "starting")) == {"active": 2, "starting": 1}


def test_a_status_change_in_place_refuses_or_leaves_to_the_general_path(
        store: SqliteFlowStore) -> None:
    flow_id = store.insert(document(status="starting"))["_id"]
    for precondition in ({"statuses": ("stopping",)}, {"revision": 2}, {"revision": (3, 4)}):
        assert store.update(flow_id, **precondition, changes=STARTED, history=ENTRY,
                            returning=("status",)) is None
    assert store.raw(flow_id)["revision"] == 1 and store.history.get(flow_id, 2) is None
    # an entry an earlier layout left pending: the general path records it first
    store._change_document(flow_id, lambda flow: flow.update(
        historyOutbox=[{**ENTRY, "entryId": "left"}]) or True)
    assert store.update(flow_id, statuses=("starting",), changes=STARTED, history=ENTRY,
                        returning=("status",)) == {"_id": flow_id, "status": "active"}
    assert "historyOutbox" not in store.raw(flow_id)
    assert [store.history.get(flow_id, revision)["entryId"] for revision in (1, 2)] == [
        "left", ENTRY["entryId"]]
    gone = store.insert(document(status="starting", deletedAt=MOMENT))["_id"]
    assert store.update(gone, changes=STARTED, history=ENTRY, returning=("status",)) is None


def test_memory_is_one_database_for_every_thread_of_the_process() -> None:
    store = SqliteFlowStore.open(":memory:")
    flow = store.insert(document())
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(store.get(flow["_id"])))
    thread.start()
    thread.join()
    assert seen[0]["_id"] == flow["_id"]
    store.close()


def test_the_threads_of_a_process_write_on_one_connection_and_read_their_write(
        tmp_path: Path) -> None:
    """Writes of every thread go through one connection (its page cache stays warm from one
    write to the next); a read inside a write, by query or reading, sees what it wrote."""
    store = SqliteFlowStore.open(str(tmp_path / "flows.sqlite3"))
    database = store.database
    used: list[Any] = []

    def write() -> None:
        with database.writing() as connection:
            used.append(connection)

    try:
        threads = [threading.Thread(target=write) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        write()
        assert len(used) == 4 and all(connection is used[0] for connection in used)
        with database.writing() as connection:
            connection.execute("INSERT INTO generations (name, value) VALUES ('probe', 7)")
            probe = "SELECT value FROM generations WHERE name = 'probe'"
            assert database.query(probe) == [(7,)]
            with database.reading() as reader:
                assert reader.execute(probe).fetchall() == [(7,)]
            outside: list[Any] = []  # another thread reads the last commit, not this write
            thread = threading.Thread(target=lambda: outside.append(database.query(probe)))
            thread.start()
            thread.join()
            assert outside == [[]]
        assert database.query(probe) == [(7,)]
    finally:
        store.close()


def test_a_forked_child_writes_on_a_connection_of_its_own(tmp_path: Path) -> None:
    """gunicorn forks its workers: a child must not write on the connection its parent
    opened (nor queue behind the parent's writers); both go on writing to the one file."""
    store = SqliteFlowStore.open(str(tmp_path / "flows.sqlite3"))
    try:
        with store.database.writing() as parents:
            pass
        child = os.fork()
        if child == 0:  # the child: exit status 0 only if it wrote on a new connection
            status = 1
            try:
                with store.database.writing() as own:
                    status = 2 if own is parents else 0
                store.insert(document())
            finally:
                os._exit(status)
        assert os.waitpid(child, 0)[1] == 0
        with store.database.writing() as again:
            assert again is parents
        store.insert(document())
        assert store.database.query("SELECT count(*) FROM flows") == [(2,)]
    finally:
        store.close()


def test_values_that_look_like_the_encodings_tags_come_back_verbatim(
        store: SqliteFlowStore) -> None:
    settings = {"$date": 5, "$oid": "not an id", "one": {"$date": 7}, "two": {"$oid": "x"},
                "three": {"$esc": 1}, "four": {"$escape$date": {"$date": 1}},
                "a.b": {"$in": [1]}, "list": [{"$date": "x"}, (1, 2)], "nul\x00": 1}
    flow = store.insert(document(flowSettings=settings))
    expected = {**settings, "list": [{"$date": "x"}, [1, 2]]}
    assert store.get(flow["_id"])["flowSettings"] == expected


def test_a_busy_database_is_unavailable_not_an_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from flow_repository.adapters.store import StoreUnavailable, sqlite

    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_SECONDS", 0.05)
    path = str(tmp_path / "flows.sqlite3")
    store = SqliteFlowStore.open(path)
    flow = store.insert(document())
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailable, match="SQLite is unavailable"):
            store.update(flow["_id"], changes={"name": "x"}, history=ENTRY)
        assert store.get(flow["_id"])["name"] == "flow"  # readers do not wait (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.close()


def test_a_database_away_inside_a_joined_write_is_unavailability_where_it_happens(
        tmp_path: Path) -> None:
    """A write joining an open transaction (a burst of reports) reports the database away as
    StoreUnavailable at its own level, as a write of its own does, not as a SQLite error."""
    from flow_repository.adapters.store import StoreUnavailable

    store = SqliteFlowStore.open(str(tmp_path / "flows.sqlite3"))
    away = sqlite3.OperationalError("disk I/O error")
    away.sqlite_errorcode = sqlite3.SQLITE_IOERR
    seen = []
    try:
        with store.database.writing():
            try:
                with store.database.writing():
                    raise away
            except StoreUnavailable as error:  # here, inside the transaction it joined
                seen.append(error)
        assert len(seen) == 1
        with pytest.raises(StoreUnavailable), store.database.writing():
            raise away  # and a write of its own, as before
        flow = store.insert(document())  # that one was rolled back, not left open
        assert store.get(flow["_id"]) is not None
    finally:
        store.close()


def test_a_commit_that_fails_leaves_no_transaction_for_the_next_write_to_join(
        tmp_path: Path) -> None:
    path = str(tmp_path / "flows.sqlite3")
    store = SqliteFlowStore.open(path)
    database = store.database
    try:
        with database.writing() as connection:
            connection.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            connection.execute("CREATE TABLE child (parent REFERENCES parent (id) "
                               "DEFERRABLE INITIALLY DEFERRED)")
        # the connection writes are made on, between transactions (a no-op inside one)
        connection.execute("PRAGMA foreign_keys = ON")
        # a deferred constraint is checked by COMMIT, which fails with the transaction open
        with pytest.raises(sqlite3.IntegrityError), database.writing() as connection:
            connection.execute("INSERT INTO child VALUES (1)")
        with database.writing() as connection:
            connection.execute("INSERT INTO parent VALUES (5)")
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT id FROM parent").fetchall() == [(5,)]
            assert other.execute("SELECT count(*) FROM child").fetchone() == (0,)
        finally:
            other.close()
    finally:
        store.close()


def test_writers_queue_on_the_write_turn_and_a_held_turn_is_unavailability(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from flow_repository.adapters.store import StoreUnavailable, sqlite

    path = str(tmp_path / "flows.sqlite3")
    store = SqliteFlowStore.open(path)
    flow = store.insert(document())
    writers = [SqliteFlowStore.open(path) for _ in range(4)]  # as other processes would

    applied: list[int] = []

    def patch(writer: SqliteFlowStore) -> None:
        for _ in range(25):
            current = writer.get(flow["_id"])
            if writer.update(flow["_id"], changes={"description": "x"}, history=ENTRY,
                             revision=current["revision"]) is not None:
                applied.append(current["revision"])

    threads = [threading.Thread(target=patch, args=(writer,)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # each read-then-write raced the others: every applied one took the next revision
    assert sorted(applied) == list(range(1, len(applied) + 1))
    assert store.get(flow["_id"])["revision"] == len(applied) + 1

    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_SECONDS", 0.05)
    holder = os.open(f"{path}.write-turn", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process holds the turn and does not let go
    try:
        with pytest.raises(StoreUnavailable, match="SQLite is unavailable"):
            store.update(flow["_id"], changes={"name": "x"}, history=ENTRY)
    finally:
        os.close(holder)
    assert store.update(flow["_id"], changes={"name": "x"}, history=ENTRY)["name"] == "x"
    for writer in (store, *writers):
        writer.close()


def test_a_write_turn_file_that_cannot_be_opened_is_unavailability(tmp_path: Path) -> None:
    from flow_repository.adapters.store import StoreUnavailable

    path = str(tmp_path / "flows.sqlite3")
    (tmp_path / "flows.sqlite3.write-turn").mkdir()  # in the way of the lock file
    store = SqliteFlowStore.open(path)
    try:
        with pytest.raises(StoreUnavailable, match="SQLite is unavailable"):
            store.insert(document())
        assert store.list(ListQuery(), None) == ([], 0)  # nothing half written
    finally:
        store.close()


# ----------------------------------------------------------------------------- backup


def test_backup_and_restore_round_trip_a_store_under_write_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "flows.sqlite3")
    monkeypatch.setenv("EMBEDDED_DB_PATH", path)
    monkeypatch.delenv("MONGODB_URL", raising=False)
    store = SqliteFlowStore.open(path)
    stop = threading.Event()
    written: list[ObjectId] = []

    def write() -> None:
        # Flow n is created, then changed once: a consistent copy holds a prefix of the
        # flows, and each one either untouched (revision 1) or changed with its entry.
        writer = SqliteFlowStore.open(path)  # as another process would
        number = 0
        while not stop.is_set():
            flow = writer.insert(document(name=f"{number:05d}"))
            writer.update(flow["_id"], changes={"description": "changed"}, history=ENTRY,
                          events=[{"eventId": f"e{number}", "storedAt": utcnow()}])
            written.append(flow["_id"])
            number += 1
        writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        copies = []
        for number in range(3):
            # each backup is taken while the writer goes on
            while len(written) < 20 * (number + 1):
                stop.wait(0.01)
            copies.append(str(tmp_path / f"backup-{number}.sqlite3"))
            assert main(["backup", "-o", copies[-1]]) == 0
    finally:
        stop.set()
        thread.join()
    for copy in copies:
        check_consistent(SqliteFlowStore.open(copy))
    assert "Backed up" in capsys.readouterr().out

    final = str(tmp_path / "final.sqlite3")
    assert main(["backup", "-o", final]) == 0
    expected = snapshot(store)
    store.drop_all()
    store.close()
    assert main(["restore", final]) == 0
    restored = SqliteFlowStore.open(path)
    assert snapshot(restored) == expected
    assert len(expected[0]) == len(written)
    restored.close()


def check_consistent(copy: SqliteFlowStore) -> None:
    flows, total = copy.list(ListQuery(page_size=1000, sort_field="name"), ("alice",))
    assert total == len(flows) > 0
    assert [flow["name"] for flow in flows] == [f"{n:05d}" for n in range(total)]
    for flow in flows[:-1]:  # every flow but the newest has been changed by then
        assert flow["revision"] == 2 and flow["description"] == "changed"
        assert len(flow["outbox"]) == 1 and "historyOutbox" not in flow
        assert copy.history.get(flow["_id"], 2)["entryId"] == ENTRY["entryId"]
    last = flows[-1]
    assert (last["revision"], copy.history.get(last["_id"], 2) is not None) in (
        (1, False), (2, True))
    copy.close()


def snapshot(store: SqliteFlowStore) -> tuple[list[dict], int, Any]:
    flows, _ = store.list(ListQuery(page_size=1000), None)
    return ([store.raw(flow["_id"]) for flow in flows], store.outbox_backlog()[0],
            store.count_by_status(STATUSES))


def test_restore_refuses_a_file_that_is_no_backup(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDED_DB_PATH", str(tmp_path / "flows.sqlite3"))
    monkeypatch.delenv("MONGODB_URL", raising=False)
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    assert main(["restore", str(other)]) == 2


def test_backup_points_mongodb_users_to_mongodump(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MONGODB_URL", "mongodb://127.0.0.1:1/flows")
    assert main(["backup", "-o", "x"]) == 2
    assert "mongodump" in capsys.readouterr().err


def test_a_database_or_backup_of_schema_1_is_upgraded_with_the_change_feed(
        tmp_path: Path) -> None:
    old = tmp_path / "schema-1.sqlite3"
    connection = sqlite3.connect(old)
    connection.executescript(
        "CREATE TABLE flows (id BLOB NOT NULL UNIQUE, doc TEXT NOT NULL, lease_until INTEGER,"
        " lease_owner TEXT, deleted INTEGER, status, type, template, name, created, updated,"
        " retries, changed INTEGER, revision, owner_count INTEGER, search_name BLOB,"
        " search_description BLOB, pending_at, pending_count INTEGER);"
        "CREATE TABLE flow_owners (fid BLOB NOT NULL, owner NOT NULL, name, created, updated,"
        " PRIMARY KEY (fid, owner)) WITHOUT ROWID;"
        "CREATE TABLE flow_history (fid BLOB NOT NULL, revision INTEGER NOT NULL, kind TEXT,"
        " entry TEXT NOT NULL, PRIMARY KEY (fid, revision));"
        "PRAGMA user_version = 1;")
    connection.close()
    backup = tmp_path / "schema-1-backup.sqlite3"
    backup.write_bytes(old.read_bytes())
    reopened = SqliteFlowStore.open(str(old))  # a file an older version wrote
    flow = reopened.insert(document(historyOutbox=[{"entryId": "h", "kind": "definition",
                                                    "change": "created", "at": utcnow()}]))
    assert [change["flowId"] for change in reopened.changes.after(0, 10)] == [flow["_id"]]
    reopened.close()
    target = SqliteFlowStore.open(str(tmp_path / "restored.sqlite3"))
    target.restore(str(backup))  # a backup an older version made
    target.insert(document(historyOutbox=[{"entryId": "h", "kind": "definition",
                                           "change": "created", "at": utcnow()}]))
    assert len(target.changes.after(0, 10)) == 1
    target.close()


def test_a_kept_list_total_is_counted_again_once_any_process_changes_who_sees_what(
        tmp_path: Path) -> None:
    path = str(tmp_path / "flows.sqlite3")
    reader, writer = SqliteFlowStore.open(path), SqliteFlowStore.open(path)  # two processes
    statements: list[str] = []
    reader.database.trace(statements.append)

    def total(**filters: Any) -> tuple[int, bool]:
        """The total of alice's first page, and whether it was counted (not kept)."""
        statements.clear()
        _, found = reader.list(ListQuery(page_size=2, **filters), ("alice", "acme"))
        return found, any("count(*)" in statement for statement in statements)

    flows = [writer.insert(document()) for _ in range(3)]
    assert total() == (3, True)
    assert total() == (3, False)  # nothing changed: kept
    writer.update(flows[0]["_id"], changes={"status": "active"}, history=ENTRY)
    assert total() == (3, False)  # a field no kept total reads
    assert total(status="active") == (1, True)  # a filter on a field is always counted
    writer.insert(document(owners=("bob",)))
    assert total() == (3, True)  # another scope's flow: counted again, the same
    writer.insert(document(owners=("acme",)))
    assert total() == (4, True)
    writer.update(flows[1]["_id"], changes={"owners": [{"id": "bob", "type": "user"}]},
                  history=ENTRY)
    assert total() == (3, True)
    writer.update(flows[2]["_id"], changes={"deletedAt": MOMENT}, history=ENTRY)
    assert total() == (2, True)
    assert reader.list(ListQuery(page_size=2), None)[1] == 4  # every live flow (an admin)
    assert total() == (2, False)

    # A restored backup may hold any generation, even one a process kept a total at.
    source = SqliteFlowStore.open(str(tmp_path / "source.sqlite3"))
    source.insert(document())
    source.backup(str(tmp_path / "backup.sqlite3"))
    source.close()
    [(kept_at,)] = reader.database.query(
        "SELECT value FROM generations WHERE name = 'membership'")
    with sqlite3.connect(tmp_path / "backup.sqlite3") as backup:
        backup.execute("UPDATE generations SET value = ? WHERE name = 'membership'",
                       (kept_at,))
    writer.restore(str(tmp_path / "backup.sqlite3"))
    assert total() == (1, True)
    reader.close()
    writer.close()


def test_a_flow_read_to_be_shown_is_decoded_once_per_stored_state_with_its_projections(
        tmp_path: Path) -> None:
    path = str(tmp_path / "flows.sqlite3")
    reader, writer = SqliteFlowStore.open(path), SqliteFlowStore.open(path)  # two processes
    flow = writer.insert(document(name="first"))

    def listed() -> SharedDocument:
        [found], _ = reader.list(ListQuery(), ("alice",))
        return found

    first = listed()
    assert isinstance(first, SharedDocument) and first["name"] == "first"
    first.projections[len] = "derived once"  # keyed by the function that derived it
    assert listed() is first  # the row unchanged: the same document, what was derived kept
    assert reader.get(flow["_id"], ("alice",), shared=True) is first  # GET of one flow too
    assert reader.get(flow["_id"], ("bob",), shared=True) is None  # still owner-scoped
    fresh = reader.get(flow["_id"])  # a reader that may change what it reads: its own copy
    assert fresh == first and fresh is not first and not isinstance(fresh, SharedDocument)
    writer.update(flow["_id"], changes={"name": "second"}, history=ENTRY)
    second = listed()  # changed by another process: decoded again, nothing derived kept
    assert second is not first and second["name"] == "second" and not second.projections
    assert first["name"] == "first"  # a reader still holding the old state keeps it
    with writer.database.writing() as connection:  # the lease is in the row, not the text
        connection.execute("UPDATE flows SET lease_until = 1, lease_owner = 'relay'")
    leased = listed()
    assert leased is not second and leased["relayLeaseOwner"] == "relay"
    reader.close()
    writer.close()


@pytest.mark.parametrize("bound", [{"capacity": 4}, {"capacity_chars": 4 * 12}])
def test_flows_kept_for_readers_are_bounded_in_number_and_in_size(bound: dict) -> None:
    shared = SharedDocuments(**bound)
    rows = [(str(number), '{"name":"f"}', None, None) for number in range(10)]  # 12 chars
    documents = [shared.document(row) for row in rows]
    assert shared.document(rows[-1]) is documents[-1]
    assert shared.document(rows[0]) is not documents[0]  # forgotten, decoded again
    big = ('"big"', json.dumps({"name": "x" * 100}), None, None)
    assert shared.document(big) is shared.document(big)  # one flow past the size: kept


KEYS = st.sampled_from(["a", "name", "$date", "$oid", "$esc", "$escname", "$x", "q\"{\"$"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.text(max_size=5)
           | st.sampled_from(['{"$date":1}', '"$', "{"])
           | st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.replace(
               microsecond=moment.microsecond // 1000 * 1000))
           | st.builds(ObjectId))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_a_document_reads_back_as_written_whatever_its_keys(document: dict[str, Any]) -> None:
    # JSON's own encoder writes it, and a Python walk only when a "$" key may need escaping:
    # either way a one-key object shaped like a date or an ObjectId tag stays what it was.
    assert loads(dumps(document)) == document


@pytest.mark.parametrize("value", [{1, 2}, datetime(2026, 1, 1).date(), b"bytes"],
                         ids=["set", "date", "bytes"])
def test_a_value_json_cannot_hold_is_refused_not_written_as_something_else(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot keep a value of type"):
        dumps({"settings": {"nested": [value]}})
