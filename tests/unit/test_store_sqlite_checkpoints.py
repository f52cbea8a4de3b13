"""The embedded store's checkpoints: written pages reach the database file from a thread of
their own, not inside a writer's commit; the thread sleeps when idle and stops with the store."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from bson import ObjectId

from flow_repository.adapters.store import SqliteFlowStore, utcnow
from flow_repository.adapters.store.checkpoints import BACKSTOP_PAGES, WalCheckpointer
from support import eventually

THREAD = "sqlite-checkpoint"


def new_flow(number: int) -> dict:
    return {"_id": ObjectId(), "name": f"flow {number}", "type": "ordinary",
            "status": "inactive", "owners": [{"id": "alice", "type": "user"}], "revision": 1,
            "createdAt": utcnow(), "updatedAt": utcnow(), "outbox": []}


def flows_in_file_alone(path: Path, scratch: Path) -> int:
    """The flows the database file holds without its write-ahead log (what was checkpointed)."""
    copy = scratch / "file-alone.sqlite3"
    shutil.copyfile(path, copy)
    connection = sqlite3.connect(copy)
    try:
        tables = {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        return connection.execute("SELECT count(*) FROM flows").fetchone()[0] \
            if "flows" in tables else 0
    finally:
        connection.close()
        copy.unlink()


def checkpoint_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_written_pages_reach_the_file_from_the_thread_not_from_a_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpointing: bool) -> None:
    if not checkpointing:  # the control: then only a writer could have checkpointed
        monkeypatch.setattr(WalCheckpointer, "committed", lambda self: None)
    path = tmp_path / "flows.sqlite3"
    store = SqliteFlowStore.open(str(path))
    try:
        store.ensure_indexes()
        with store.database.writing() as connection:
            assert connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
        for number in range(20):  # a few hundred pages: far below the writers' backstop
            store.insert(new_flow(number))
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        if checkpointing:
            eventually(lambda: flows_in_file_alone(path, scratch) == 20, 5)
        else:
            time.sleep(0.5)
            assert flows_in_file_alone(path, scratch) == 0
        assert store.get(ObjectId()) is None  # and the store reads on as before
    finally:
        store.close()


def test_the_thread_starts_with_writes_and_stops_with_the_store(tmp_path: Path) -> None:
    before = len(checkpoint_threads())
    store = SqliteFlowStore.open(str(tmp_path / "flows.sqlite3"))
    try:
        store.get(ObjectId())  # reads alone start nothing
        assert len(checkpoint_threads()) == before
        store.insert(new_flow(1))
        assert len(checkpoint_threads()) == before + 1
        store.close()
        eventually(lambda: len(checkpoint_threads()) == before, 5)
        store.insert(new_flow(2))  # a store used again after close checkpoints again
        assert len(checkpoint_threads()) == before + 1
        assert store.get(ObjectId()) is None
    finally:
        store.close()
    eventually(lambda: len(checkpoint_threads()) == before, 5)


def test_a_checkpoint_that_cannot_run_is_skipped_and_the_thread_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = len(checkpoint_threads())
    checkpointer = WalCheckpointer(str(tmp_path / "no such directory" / "flows.sqlite3"),
                                   interval=0.01)
    caplog.set_level("DEBUG", logger="flow_repository.adapters.store.checkpoints")
    try:
        checkpointer.committed()
        eventually(lambda: "checkpoint skipped" in caplog.text, 5)
        caplog.clear()
        checkpointer.committed()
        eventually(lambda: "checkpoint skipped" in caplog.text, 5)
        assert len(checkpoint_threads()) == before + 1  # this one's thread, still running
    finally:
        checkpointer.stop()
    eventually(lambda: len(checkpoint_threads()) == before, 5)
