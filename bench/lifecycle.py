"""Event-path latency: /start 200 -> flow.starting on the broker, flow.started -> GET active."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import pika
import pika.exceptions
import requests

# p99 targets: start -> flow.starting from the scale-out issue, started -> active from the first
START_TO_STARTING_TARGET_MS = 200.0
STARTED_TO_ACTIVE_TARGET_MS = 500.0


class Listener:
    """A thread that records when each flow.starting message arrives, by payload id."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        self._exchange = exchange
        self._routing_key = routing_key
        self._arrivals: dict[str, tuple[float, dict]] = {}
        self._condition = threading.Condition()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"listener could not bind: {self._error!r}")

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(harness.QUEUE_URL))
            channel = connection.channel()
            channel.exchange_declare(self._exchange, "topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, self._exchange, routing_key=self._routing_key)
            channel.basic_consume(queue, self._on_message, auto_ack=True)
        except BaseException as error:  # noqa: BLE001 - reported by start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.05)
        finally:
            connection.close()

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        arrived = time.perf_counter()
        message = json.loads(body)
        flow_id = message.get("payload", {}).get("id")
        with self._condition:
            self._arrivals.setdefault(flow_id, (arrived, message))
            self._condition.notify_all()

    def wait_for(self, flow_id: str, timeout: float) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while flow_id not in self._arrivals:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {self._routing_key} for flow {flow_id} in {timeout}s")
                self._condition.wait(left)
            return self._arrivals[flow_id]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_for_consumer(queue: str, timeout: float = 60.0) -> None:
    """Wait until the service consumes its queue, so a published flow.started is routed."""
    deadline = time.monotonic() + timeout
    connection = pika.BlockingConnection(pika.URLParameters(harness.QUEUE_URL))
    try:
        while time.monotonic() < deadline:
            channel = connection.channel()
            try:
                if channel.queue_declare(queue, passive=True).method.consumer_count > 0:
                    channel.close()
                    return
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet
            time.sleep(0.1)
    finally:
        connection.close()
    raise RuntimeError(f"the service did not start consuming {queue} within {timeout}s")


def summary(values_ms: list[float], target_ms: float) -> dict[str, Any]:
    return {
        "n": len(values_ms),
        "p50Ms": round(harness.percentile(values_ms, 0.50), 2),
        "p95Ms": round(harness.percentile(values_ms, 0.95), 2),
        "p99Ms": round(harness.percentile(values_ms, 0.99), 2),
        "maxMs": round(max(values_ms), 2),
        "meanMs": round(sum(values_ms) / len(values_ms), 2),
        "targetP99Ms": target_ms,
        "met": harness.percentile(values_ms, 0.99) < target_ms,
    }


def cycle(client: harness.Client, listener: Listener, publisher: Any, exchange: str,
          flow_id: str, arguments: argparse.Namespace) -> tuple[float, float]:
    """One start -> flow.starting, flow.started -> active round; both latencies in seconds."""
    answer = client.call("POST", f"/flows/{flow_id}/start", 200)
    t0 = time.perf_counter()
    if answer["data"]["status"] != "starting":
        raise RuntimeError(f"start answered {answer}")
    t1, message = listener.wait_for(flow_id, arguments.timeout)
    if message["payload"].get("status") != "starting":
        raise RuntimeError(f"flow.starting payload has status {message['payload'].get('status')}")

    envelope = {"headers": {"name": "flow.started", "createdAt": int(time.time() * 1000),
                            "serviceName": "component-orchestrator"},
                "payload": {"id": flow_id}}
    t2 = time.perf_counter()
    publisher.basic_publish(exchange, "flow.started", json.dumps(envelope).encode(),
                            pika.BasicProperties(content_type="application/json",
                                                 delivery_mode=pika.DeliveryMode.Persistent))
    deadline = t2 + arguments.timeout
    while True:
        status = client.call("GET", f"/flows/{flow_id}", 200)["data"]["status"]
        t3 = time.perf_counter()
        if status == "active":
            return t1 - t0, t3 - t2
        if t3 > deadline:
            raise TimeoutError(f"flow {flow_id} still {status} {arguments.timeout}s after "
                               "flow.started")
        time.sleep(arguments.poll_ms / 1000)


def run(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    exchange = harness.unique_name("lifecycle-exchange")
    queue = harness.unique_name("lifecycle-queue")
    secret = workdir / "dev-token-secret"
    token = harness.mint(secret, "bench-user", "bench-tenant")
    env = harness.base_env(secret, None, exchange, queue)
    server = harness.product_server(env, harness.free_port(), workdir)
    listener = Listener(exchange, "flow.starting")
    publisher_connection = None
    try:
        server.start()
        listener.start()
        wait_for_consumer(queue)
        session = requests.Session()
        client = harness.Client(server.url, token, session)
        if arguments.stored_flows:
            other = harness.Client(server.url, harness.mint(secret, "other-user", "other-tenant"),
                                   session)
            harness.seed([other], arguments.stored_flows, batch=arguments.bulk_size,
                         prefix="stored flow")
        total = arguments.flows + arguments.warmup
        ids = harness.seed([client], total, batch=arguments.bulk_size)[0]
        waited, left = harness.wait_for_outbox(server.url, arguments.drain_timeout, poll=0.2)
        print(f"created {total} flows (+{arguments.stored_flows} of another owner); outbox "
              f"drained in {waited:.1f}s ({left or 0:.0f} events left)", flush=True)
        publisher_connection = pika.BlockingConnection(pika.URLParameters(harness.QUEUE_URL))
        publisher = publisher_connection.channel()
        publisher.confirm_delivery()

        starting: list[float] = []
        active: list[float] = []
        for index, flow_id in enumerate(ids):
            to_starting, to_active = cycle(client, listener, publisher, exchange, flow_id,
                                           arguments)
            if index < arguments.warmup:
                continue
            starting.append(to_starting)
            active.append(to_active)
            if len(starting) % 50 == 0:
                print(f"  {len(starting)}/{arguments.flows} flows", flush=True)
        early = sum(1 for value in starting if value < 0)
        return {
            "benchmark": "bench/lifecycle.py",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "store": harness.describe_store(None, server.workers()),
            "flows": arguments.flows,
            "otherStoredFlows": arguments.stored_flows,
            "outboxPendingBeforeRounds": left,
            "warmupFlows": arguments.warmup,
            "pollMs": arguments.poll_ms,
            "startToStarting": {
                **summary([max(0.0, value) * 1000 for value in starting],
                          START_TO_STARTING_TARGET_MS),
                "arrivedBeforeThe200": early,
                "rawMinMs": round(min(starting) * 1000, 2),
            },
            "startedToActive": summary([value * 1000 for value in active],
                                      STARTED_TO_ACTIVE_TARGET_MS),
            "workerMemory": server.memory(),
        }
    finally:
        if publisher_connection is not None and publisher_connection.is_open:
            publisher_connection.close()
        listener.stop()
        server.stop()
        harness.delete_broker_objects(exchange, [queue, f"{queue}.dead-letter"])


def table(report: dict[str, Any]) -> str:
    lines = ["| latency | n | p50 ms | p95 ms | p99 ms | max ms | target | met |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    labels = {"startToStarting": "200 of POST /start -> flow.starting on the broker",
              "startedToActive": "flow.started published -> status active via GET"}
    for key, label in labels.items():
        row = report[key]
        lines.append(f"| {label} | {row['n']} | {row['p50Ms']:.2f} | {row['p95Ms']:.2f} | "
                     f"{row['p99Ms']:.2f} | {row['maxMs']:.2f} | p99 < {row['targetP99Ms']:.0f} ms | "
                     f"{'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=200, help="measured start/started rounds")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first")
    parser.add_argument("--poll-ms", type=float, default=5.0,
                        help="pause between GET polls while waiting for active")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each event or status")
    parser.add_argument("--bulk-size", type=int, default=100, help="flows per creating POST")
    parser.add_argument("--stored-flows", type=int, default=0,
                        help="extra flows of another owner stored first (store size effect)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the relay to publish the creation events")
    parser.add_argument("--output",
                        default=str(harness.BENCH_DIR / "results" / "lifecycle.json"))
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with the server logs")
    arguments = parser.parse_args()
    if arguments.flows < 1:
        parser.error("--flows must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="flow-repository-lifecycle-"))
    print(f"store: {harness.describe_store(None, {})}\nlogs in {workdir}", flush=True)
    report = run(arguments, workdir)
    early = report["startToStarting"]["arrivedBeforeThe200"]
    summary = (f"{table(report)}\n\n(flow.starting arrived before the 200 was read {early} "
               "times; counted as 0 ms)")
    return harness.finish(report, arguments.output, summary, workdir, arguments.keep_logs)

if __name__ == "__main__":
    sys.exit(main())
