"""Embedded ``serve`` on a file: one API worker at a time consumes, none while a ``worker``
process shares the database, and restore sees the file in use (the lock files beside it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from flow_repository.server.bootstrap import ConsumerTurn, WorkerPresence, database_in_use
from flow_repository.settings import Settings


class FakeConsumer:
    """Stands in for StatusConsumer: records that it runs."""

    def __init__(self, *args: object) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


@pytest.fixture
def database(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "flows.sqlite3")  # its directory does not exist yet


def api_worker(database: str) -> tuple[SimpleNamespace, ConsumerTurn]:
    """An API worker's runtime (what ConsumerTurn uses of it) and its turn."""
    process = SimpleNamespace(
        settings=Settings.from_env({}, embedded_db_path=database),
        service=SimpleNamespace(reconcile=lambda: None), metrics=None, consumer=None,
        consumer_factory=FakeConsumer, tracing=None)
    # a long interval: the test ticks itself
    return process, ConsumerTurn(process, database, interval=3600)


def test_one_api_worker_at_a_time_consumes_and_another_takes_over(database: str) -> None:
    first, first_turn = api_worker(database)
    second, second_turn = api_worker(database)
    first_turn.start()
    second_turn.start()
    assert first.consumer is not None and first.consumer.running
    assert second.consumer is None
    assert database_in_use(database)
    first_turn.stop()  # as when that worker exits (or is killed: the kernel frees the lock)
    assert first.consumer is None
    second_turn._tick()
    assert second.consumer is not None and second.consumer.running
    second_turn.stop()
    assert not database_in_use(database)


def test_the_api_stands_down_while_a_worker_process_runs(database: str) -> None:
    api, turn = api_worker(database)
    turn.start()
    consumer = api.consumer
    presence = WorkerPresence(database)
    turn._tick()
    assert api.consumer is None and not consumer.running
    assert database_in_use(database)
    presence.close()
    turn._tick()
    assert api.consumer is not None and api.consumer.running
    turn.stop()


def test_a_worker_found_at_start_keeps_the_api_from_ever_consuming(database: str) -> None:
    presence = WorkerPresence(database)
    api, turn = api_worker(database)
    turn.start()
    assert api.consumer is None
    turn.stop()
    presence.close()
