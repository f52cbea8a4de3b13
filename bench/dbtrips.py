"""MongoDB round trips per operation, async work included, counted with PyMongo's command
monitoring: the API (with its outbox relay) and a worker's consumer, in this process.

    .venv/bin/python bench/dbtrips.py                      # starts a SecantusDB server itself
    .venv/bin/python bench/dbtrips.py --mongodb-url mongodb://localhost:27017

Each operation runs ``--count`` times, one after the other; after each one the bench waits
until the service has been quiet for a moment (its relay and consumer done), so the
history write, the publish bookkeeping and the lease are counted with the operation that
caused them. Idle relay polls (one query per RELAY_POLL_SECONDS) fall into the windows and
are counted too. The burst runs 8 clients at once, each PATCHing a flow of its own.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pika
from pymongo import monitoring

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import (
    QUEUE_URL,
    delete_broker_objects,
    drop_mongodb_database,
    mongodb_database_url,
    unique_name,
)

OIH_NODE = {"GET /flows/{id}": 1, "GET /flows (a page)": 2, "POST /flows": 1,
            "PATCH /flows/{id}": 2, "DELETE /flows/{id}": 2, "POST /flows/{id}/start": 2,
            "one status event applied": 1, "PATCH from 8 clients at once": 2}
QUIET = 0.25  # seconds without a command: the async work of an operation is done


class Counter(monitoring.CommandListener):
    """Counts the commands every MongoClient of this process sends (one round trip each)."""

    def __init__(self) -> None:
        self.count = 0
        self.names: collections.Counter[str] = collections.Counter()  # commands by name (with their collection)
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            self.count += 1
            self.names[f"{event.command_name} {event.command.get(event.command_name)}"] += 1
            self.last = time.monotonic()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def settle(self) -> None:
        """Wait until no command was sent for QUIET seconds."""
        while time.monotonic() - self.last < QUIET:
            time.sleep(0.02)


@dataclass
class Window:
    """Commands counted over some operations, and how long that took."""

    commands: float
    seconds: float
    operations: int
    names: collections.Counter[str]  # the commands by name and collection, idle polls included

    def per_operation(self, idle_rate: float = 0.0) -> float:
        """Round trips per operation; without the idle polls (``idle_rate`` per second)."""
        return (self.commands - idle_rate * self.seconds) / self.operations


def measure(counter: Counter, count: int, operation: Callable[[int], int | None]) -> Window:
    """Run ``operation`` ``count`` times, each followed by quiet; an operation may return
    how many commands of its own (the bench's, not the service's) to leave out."""
    counter.settle()
    before, started, own = counter.count, time.monotonic(), 0
    names_before = collections.Counter(counter.names)
    for index in range(count):
        leave_out = operation(index)
        own += leave_out if isinstance(leave_out, int) else 0
        counter.settle()
    return Window(counter.count - before - own, time.monotonic() - started, count,
                  counter.names - names_before)


def idle_rate(counter: Counter, seconds: float = 12.0) -> float:
    """Commands per second while nothing happens: the relays' polls for pending events, and
    their sweeps for history left pending (one every RELAY_LEASE_SECONDS / 3 = 10 s each)."""
    counter.settle()
    before = counter.count
    time.sleep(seconds)
    return (counter.count - before) / seconds


def run(url: str, count: int) -> tuple[float, dict[str, Window]]:
    from bson import ObjectId
    from harness import sample_flow

    from flow_repository.adapters.auth import mint_token
    from flow_repository.entrypoints.app import create_app
    from flow_repository.entrypoints.consumer import StatusConsumer
    from flow_repository.server.bootstrap import Runtime
    from flow_repository.settings import Settings

    counter = Counter()
    monitoring.register(counter)
    database = unique_name("dbtrips").replace("-", "_")
    exchange, queue = unique_name("exchange"), unique_name("queue")
    secret = Path(tempfile.mkdtemp()) / "dev-secret"
    settings = Settings.from_env(
        {}, mongodb_url=mongodb_database_url(url, database),
        queue_url=QUEUE_URL, event_exchange=exchange, event_queue=queue,
        dev_token_secret_file=str(secret), dev_tokens="allow", log_level="ERROR")
    app = create_app(settings, background=True)  # the API process: its relay
    worker = Runtime.build(settings, relay=True, consumer=StatusConsumer)  # a worker: consumer, relay
    worker.start()
    client = app.test_client()
    token = mint_token(settings, "bench-user", "bench-tenant",
                       ["flows.read", "flows.write", "flows.control", "flows.bulk"], 3600)
    headers = {"Authorization": f"Bearer {token}"}
    broker = pika.BlockingConnection(pika.URLParameters(QUEUE_URL))
    channel = broker.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    try:
        time.sleep(2)  # both relays and the consumer connected

        def create(index: int) -> str:
            answer = client.post("/flows", json=sample_flow(f"Flow {index}"), headers=headers)
            assert answer.status_code == 201, answer.get_json()
            return answer.get_json()["data"]["id"]

        flows = [create(index) for index in range(count + 8)]
        results: dict[str, Window] = {}
        results["GET /flows/{id}"] = measure(counter, count, lambda i: client.get(
            f"/flows/{flows[i]}", headers=headers))
        results["GET /flows (a page)"] = measure(counter, count, lambda i: client.get(
            "/flows?page[size]=10", headers=headers))
        created: list[str] = []
        results["POST /flows"] = measure(counter, count, lambda i: created.append(create(i)))
        results["PATCH /flows/{id}"] = measure(counter, count, lambda i: client.patch(
            f"/flows/{flows[i]}", json={"description": f"change {i}"}, headers=headers))
        results["DELETE /flows/{id}"] = measure(counter, count, lambda i: client.delete(
            f"/flows/{created[i]}", headers=headers))
        results["POST /flows/{id}/start"] = measure(counter, count, lambda i: client.post(
            f"/flows/{flows[i]}/start", headers=headers))

        def report(index: int) -> int:
            """Publish one flow.started; returns how many reads it took to see it applied."""
            body = {"headers": {"name": "flow.started", "createdAt": int(time.time() * 1000),
                                "serviceName": "component-orchestrator"},
                    "payload": {"id": flows[index]}}
            channel.basic_publish(exchange, "flow.started", json.dumps(body).encode())
            deadline = time.monotonic() + 30
            polls = 1
            while worker.store.raw(ObjectId(flows[index]))["status"] != "active":
                if time.monotonic() > deadline:
                    raise RuntimeError("flow.started was not applied")
                time.sleep(0.01)
                polls += 1
            return polls

        # the polls of the flow's status are this bench's own reads: taken out again
        results["one status event applied"] = measure(counter, count, report)

        burst_flows = flows[count:count + 8]

        def burst(index: int) -> None:
            def patch(flow_id: str) -> None:
                answer = app.test_client().patch(
                    f"/flows/{flow_id}", json={"description": f"burst {index}"}, headers=headers)
                assert answer.status_code == 200, answer.get_json()

            threads = [threading.Thread(target=patch, args=(flow_id,)) for flow_id in burst_flows]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        window = measure(counter, max(1, count // 4), burst)
        window.operations *= len(burst_flows)
        results["PATCH from 8 clients at once"] = window
        return idle_rate(counter), results
    finally:
        worker.stop()
        app.extensions["flow_repository"].stop()
        broker.close()
        delete_broker_objects(exchange, [queue, f"{queue}.dead-letter"])
        drop_mongodb_database(url, database)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mongodb-url", help="a running MongoDB (default: start SecantusDB)")
    parser.add_argument("--count", type=int, default=40, help="operations of each kind")
    parser.add_argument("--by-command", action="store_true",
                        help="also list each operation's commands by name and collection")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "dbtrips.json"))
    arguments = parser.parse_args()
    if arguments.mongodb_url:
        idle, windows = run(arguments.mongodb_url, arguments.count)
    else:
        from conftest import secantus_server

        with tempfile.TemporaryDirectory() as directory, \
                secantus_server(Path(directory)) as (url, _):
            idle, windows = run(url, arguments.count)
    sequential = [name for name in OIH_NODE if name != "PATCH from 8 clients at once"]
    raw = {name: window.per_operation() for name, window in windows.items()}
    net = {name: window.per_operation(idle) for name, window in windows.items()}
    print(f"idle relay polls and sweeps: {idle:.2f} commands/s (2 relays, "
          "RELAY_POLL_SECONDS=1, RELAY_LEASE_SECONDS=30)")
    print(f"{'operation':32} {'with idle polls':>16} {'without':>8} {'OIH (Node)':>11}")
    for name in windows:
        print(f"{name:32} {raw[name]:16.2f} {net[name]:8.2f} {OIH_NODE[name]:11}")
        if arguments.by_command:
            window = windows[name]
            for command, times in sorted(window.names.items(), key=lambda item: -item[1]):
                print(f"    {times / window.operations:6.2f}  {command}")
    print(f"{'the seven sequential ones':32} {sum(raw[n] for n in sequential):16.2f} "
          f"{sum(net[n] for n in sequential):8.2f} {sum(OIH_NODE[n] for n in sequential):11}")
    Path(arguments.output).write_text(json.dumps(
        {"count": arguments.count, "idleCommandsPerSecond": idle, "withIdlePolls": raw,
         "withoutIdlePolls": net, "sequentialTotal": sum(net[n] for n in sequential),
         "oih": OIH_NODE}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
