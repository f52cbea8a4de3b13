"""WalCheckpointer: copies a SQLite database's write-ahead log back into its file, off the writers.

In WAL mode a commit only appends pages to the log; a checkpoint later copies them into the
database file (and syncs both). SQLite's own checkpoint runs inside the commit that finds
the log over ``wal_autocheckpoint`` pages, so every so many writes one request or one burst
of status reports paid for all the others: about 40 % of a POST's commit. Here a thread of
each process checkpoints (PASSIVE: never waiting for, nor holding up, readers and writers)
a moment after writes, while the writers' own autocheckpoint stays on with a larger
threshold as the backstop, should this thread fall behind or not run at all.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 0.05  # commits gathered into one checkpoint while writes go on
BACKSTOP_PAGES = 10000  # the writers' wal_autocheckpoint: 40 MiB of log at 4 KiB pages


class WalCheckpointer:
    """Checkpoints the database file ``path`` from a daemon thread of this process, started
    by the first commit it is told of (and again in a forked child, which has no threads).
    Idle, the thread sleeps until the next commit."""

    def __init__(self, path: str, interval: float = CHECKPOINT_SECONDS) -> None:
        self._path = path
        self._interval = interval
        self._pid: int | None = None  # the process whose thread runs
        self._thread: threading.Thread | None = None
        self._written = threading.Event()  # set by a commit, cleared by the checkpoint after it
        self._stop = threading.Event()
        self._starting = threading.Lock()

    def committed(self) -> None:
        """Note a commit (cheap: this is on every write's path)."""
        if self._pid != os.getpid():
            self._start()
        if not self._written.is_set():
            self._written.set()

    def _start(self) -> None:
        with self._starting:
            if self._pid == os.getpid():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="sqlite-checkpoint", daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while self._written.wait() and not stop.wait(self._interval):
            self._written.clear()  # commits from here on are for the next checkpoint
            # a connection of its own each time: an idle thread holds no file open
            try:
                connection = sqlite3.connect(self._path, timeout=0, isolation_level=None)
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    connection.close()
            except sqlite3.Error as error:  # busy, or the file away: the backstop covers it
                log.debug("checkpoint skipped", extra={"error": str(error)})

    def stop(self, timeout: float = 5.0) -> None:
        """Stop this process's thread (the next commit starts it again)."""
        self._stop.set()
        self._written.set()  # wakes the thread to see it
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout)
        self._pid = None
