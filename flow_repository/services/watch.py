"""Watching flows change: the change feed as one caller may read it, and this process's watchers.

A :class:`ChangeWatch` per process counts the open streams (``MAX_WATCHERS``, and
``MAX_WATCHERS_PER_CALLER``), and while any is open one poller thread looks at the feed's
newest seq every ``WATCH_POLL_SECONDS`` and wakes the streams when it moved. Each stream
(:class:`Watcher`) then reads the feed after its own position, in seq order, and keeps
what its caller may read and its filters ask for. It never skips a seq it has not seen:
a missing one is waited for (``WATCH_GAP_SECONDS``) and then abandoned, which decides it
for every reader (see ``adapters/store/changes.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.store import Store, StoreUnavailable, utcnow
from flow_repository.domain.flow import FlowError, InvalidFlow, ListQuery, iso, public_flow

from .access import scope

log = logging.getLogger(__name__)

READ_BATCH = 100  # changes read from the feed at once


class WatchRefused(FlowError):
    """A stream cannot be opened: too many (429, 503), or a position no longer kept (410)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}


class StreamEnded(Exception):
    """This process is shutting down: the stream ends, the client reconnects elsewhere."""


@dataclass(frozen=True)
class WatchLimits:
    """The bounds of watching in one process (from the settings)."""

    max_watchers: int = 64
    max_per_caller: int = 4
    poll_seconds: float = 0.05
    gap_seconds: float = 2.0
    retention_seconds: float = 7 * 86400.0


def parse_position(raw: str | None) -> int | None:
    """A Last-Event-ID or ``since``: a non-negative integer (400 otherwise); None if absent."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidFlow(f"Last-Event-ID: must be an event id this service sent, a "
                          f"non-negative integer (got {raw[:40]!r})")
    return int(text)


def _gone(position: int, trimmed: int) -> WatchRefused:
    return WatchRefused(410, f"changes after event {position} are no longer kept (the feed "
                             f"starts after {trimmed}): list the flows again (GET /flows) and "
                             f"watch without Last-Event-ID")


@dataclass
class ChangeWatch:
    """This process's streams: their bounds, and the poller that wakes them."""

    store: Store
    limits: WatchLimits = field(default_factory=WatchLimits)
    clock: Callable[[], float] = time.monotonic
    on_count: Callable[[int], None] = lambda count: None  # told the open streams after a change
    _condition: threading.Condition = field(default_factory=threading.Condition, init=False)
    _version: int = field(default=0, init=False)
    _newest: int | None = field(default=None, init=False)
    _callers: dict[str, int] = field(default_factory=dict, init=False)
    _closing: threading.Event = field(default_factory=threading.Event, init=False)
    _poller: threading.Thread | None = field(default=None, init=False)

    @property
    def open_streams(self) -> int:
        with self._condition:
            return sum(self._callers.values())

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def open(self, principal: Principal, since: int | None, query: ListQuery) -> Watcher:
        """A stream of ``principal``'s changes after ``since`` (None: from now on).

        400 for a position this service never handed out, 410 for one no longer kept,
        503 beyond MAX_WATCHERS (or while stopping), 429 beyond MAX_WATCHERS_PER_CALLER."""
        feed = self.store.changes
        if since is None:
            position = feed.allocated()
        else:
            allocated = feed.allocated()
            if since > allocated:
                raise InvalidFlow(f"Last-Event-ID: event {since} does not exist (the newest "
                                  f"is {allocated}); watch without it")
            trimmed = feed.trimmed_through()
            if since < trimmed:
                raise _gone(since, trimmed)
            position = since
        with self._condition:
            if self._closing.is_set():
                raise WatchRefused(503, "the service is shutting down; reconnect", 1)
            if sum(self._callers.values()) >= self.limits.max_watchers:
                raise WatchRefused(503, f"this process serves its maximum of "
                                        f"{self.limits.max_watchers} streams (MAX_WATCHERS); "
                                        f"retry later", 5)
            if self._callers.get(principal.sub, 0) >= self.limits.max_per_caller:
                raise WatchRefused(429, f"this caller has {self.limits.max_per_caller} streams "
                                        f"open already (MAX_WATCHERS_PER_CALLER); close one",
                                   5)
            self._callers[principal.sub] = self._callers.get(principal.sub, 0) + 1
            count = sum(self._callers.values())
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="watch-poller",
                                                daemon=True)
                self._poller.start()
        self.on_count(count)
        return Watcher(self, principal, position, query)

    def _release(self, sub: str) -> None:
        with self._condition:
            left = self._callers.get(sub, 0) - 1
            if left > 0:
                self._callers[sub] = left
            else:
                self._callers.pop(sub, None)
            count = sum(self._callers.values())
        self.on_count(count)

    def _poll(self) -> None:
        while not self._closing.is_set():
            with self._condition:
                if not self._callers:
                    self._poller = None  # the next stream starts another
                    return
            try:
                newest = self.store.changes.newest()
            except StoreUnavailable as error:
                log.warning("change feed unavailable", extra={"error": str(error)})
                newest = self._newest
            except Exception:
                log.exception("change feed poll failed")
                newest = self._newest
            if newest != self._newest:
                with self._condition:
                    self._newest = newest
                    self._version += 1
                    self._condition.notify_all()
            self._closing.wait(self.limits.poll_seconds)

    def version(self) -> int:
        with self._condition:
            return self._version

    def wait(self, version: int, timeout: float) -> None:
        """Until the feed moves past what ``version`` saw, or ``timeout`` seconds."""
        with self._condition:
            self._condition.wait_for(
                lambda: self._version != version or self._closing.is_set(), timeout)

    def wake(self) -> None:
        """Tell the streams to look now (a change was written in this process)."""
        with self._condition:
            self._version += 1
            self._condition.notify_all()

    def shutdown(self) -> None:
        """End every stream (SIGTERM): each sends what it has and closes."""
        self._closing.set()
        with self._condition:
            self._condition.notify_all()

    def trim(self) -> int:
        """Forget changes older than WATCH_RETENTION_SECONDS; returns the trimmed mark."""
        before = utcnow() - timedelta(seconds=self.limits.retention_seconds)
        return self.store.changes.trim(before)


class Watcher:
    """One open stream: its caller, filters and position in the feed."""

    def __init__(self, hub: ChangeWatch, principal: Principal, position: int,
                 query: ListQuery) -> None:
        self._hub = hub
        self._principal = principal
        self._owner_ids = set(principal.owner_ids)
        self._query = query
        self.position = position
        self._gap_since: float | None = None
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._release(self._principal.sub)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def admits(self, change: Mapping[str, Any]) -> bool:
        """True when the caller could read the flow as the change left it, and the
        filters (those of GET /flows) hold."""
        owners = change.get("owners") or []
        if not self._principal.is_admin and not self._owner_ids.intersection(owners):
            return False
        query = self._query
        return ((query.status is None or change.get("status") == query.status)
                and (query.type is None or change.get("type") == query.type)
                and (query.from_template is None
                     or change.get("fromTemplate") == query.from_template)
                and (query.user is None or query.user in owners))

    def next_changes(self, timeout: float) -> list[dict[str, Any]]:
        """The caller's next changes, in order; [] when none came within ``timeout``.

        StreamEnded when the process stops; WatchRefused (410) when the stream fell so
        far behind that changes it has not read were trimmed."""
        hub = self._hub
        deadline = hub.clock() + timeout
        while True:
            if hub.closing:
                raise StreamEnded()
            version = hub.version()
            visible, again = self._read()
            if visible:
                return visible
            if again:
                continue
            remaining = deadline - hub.clock()
            if remaining <= 0:
                return []
            if self._gap_since is not None:  # a missing number: look again at every poll
                remaining = min(remaining, hub.limits.poll_seconds, max(
                    0.01, self._gap_since + hub.limits.gap_seconds - hub.clock()))
            hub.wait(version, remaining)

    def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """(visible changes read, whether to read again at once)."""
        feed = self._hub.store.changes
        rows = feed.after(self.position, READ_BATCH)
        visible = []
        for row in rows:
            expected = self.position + 1
            if row["seq"] != expected:
                trimmed = feed.trimmed_through()
                if trimmed > self.position:
                    raise _gone(self.position, trimmed)
                now = self._hub.clock()
                if self._gap_since is None:
                    self._gap_since = now
                if now - self._gap_since < self._hub.limits.gap_seconds:
                    return visible, False
                log.info("change feed numbers abandoned",
                         extra={"from": expected, "to": row["seq"] - 1})
                for seq in range(expected, row["seq"]):
                    feed.abandon(seq)
                self._gap_since = None
                return visible, True
            self._gap_since = None
            self.position = row["seq"]
            if not row.get("hole") and self.admits(row):
                visible.append(row)
        return visible, len(rows) == READ_BATCH

    def event(self, change: Mapping[str, Any], *, include_flow: bool = False
              ) -> dict[str, Any]:
        """What a client is told of one change (``data:`` of the event)."""
        data: dict[str, Any] = {"id": str(change["flowId"]), "revision": change["revision"],
                                "status": change.get("status"), "change": change["change"],
                                "at": iso(change["at"])}
        if include_flow:
            flow = (None if change["change"] == "deleted" else
                    self._hub.store.get(change["flowId"], scope(self._principal)))
            data["flow"] = None if flow is None else public_flow(flow)
        return data
