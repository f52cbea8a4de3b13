"""Event throughput of the worker's consumer and of the outbox relay, each beside raw pika.

Both run in this process against the real broker, on the store MONGODB_URL names (embedded
when unset), exactly as a worker builds them (``Runtime.build``), so what is measured is
the service's own code path, not HTTP:

- consumer: status events applied per second by ``StatusConsumer`` from a queue preloaded
  with ``flow.started`` events for flows in ``starting``, against a raw pika consume+ack
  loop draining the same number of messages of the same size with the same prefetch;
- relay: creation events drained per second by ``OutboxRelay`` from a backlog of flows,
  against a raw pika publisher with per-message confirms sending the same number of
  messages of the same size to the same exchange and (durable) queue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import pika
from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.adapters.rabbitmq import Publisher
from flow_repository.adapters.relay import OutboxRelay
from flow_repository.entrypoints.consumer import StatusConsumer, dead_letter_queue, declare_queues
from flow_repository.server.bootstrap import Runtime
from flow_repository.settings import Settings

TARGET_RATIO = 0.5
OWNER = Principal(sub="bench-user", tenant="bench-tenant", permissions=frozenset(),
                  is_admin=False)
PERSISTENT = pika.BasicProperties(content_type="application/json",
                                  delivery_mode=pika.DeliveryMode.Persistent)


def channel(settings: Settings) -> Any:
    return pika.BlockingConnection(pika.URLParameters(settings.queue_url)).channel()


def ready_messages(chan: Any, queue: str) -> int:
    return chan.queue_declare(queue, passive=True).method.message_count


def preload(chan: Any, queue: str, bodies: list[bytes], exchange: str, key: str) -> None:
    """Publish ``bodies`` (confirmed as a whole) and wait until they are all in ``queue``."""
    for body in bodies:
        chan.basic_publish(exchange, key, body, PERSISTENT)
    while ready_messages(chan, queue) < len(bodies):
        time.sleep(0.05)


def seed(runtime: Runtime, count: int, *, start: bool) -> list[str]:
    ids = []
    for number in range(count):
        saved = runtime.service.create(OWNER, harness.sample_flow(f"throughput flow {number}"))
        if start:
            runtime.service.start(OWNER, saved.flow["id"])
        ids.append(saved.flow["id"])
    return ids


def status_event(flow_id: str) -> bytes:
    return json.dumps({"headers": {"name": "flow.started", "createdAt": int(time.time() * 1000),
                                   "serviceName": "component-orchestrator"},
                       "payload": {"id": flow_id}}).encode()


def measure_consumer(settings: Settings, count: int) -> dict[str, Any]:
    # as ``serve`` runs embedded: the API's service and relay, and the consumer, in one process
    runtime = Runtime.build(settings, relay=True)
    runtime.start()
    ids = seed(runtime, count, start=True)
    print(f"consumer: {count} flows in starting", flush=True)
    bodies = [status_event(flow_id) for flow_id in ids]
    chan = channel(settings)
    declare_queues(chan, settings)
    chan.confirm_delivery()
    preload(chan, settings.event_queue, bodies, settings.event_exchange, "flow.started")
    chan.connection.close()  # an idle connection would miss its heartbeats meanwhile

    consumer = StatusConsumer(settings, runtime.service, runtime.metrics)
    started = time.perf_counter()
    consumer.start()
    while applied(runtime) < count:
        time.sleep(0.005)
    service_seconds = time.perf_counter() - started
    consumer.stop()
    runtime.stop()
    active = sum(runtime.store.get(ObjectId(flow_id))["status"] == "active" for flow_id in ids)
    if active != count:
        raise RuntimeError(f"{active} of {count} flows active after the consumer ran")

    raw_queue = harness.unique_name("raw-consume")
    chan = channel(settings)
    chan.queue_declare(raw_queue, durable=True)
    preload(chan, raw_queue, bodies, "", raw_queue)
    raw_seconds = raw_consume(settings, raw_queue, count)
    chan.queue_delete(raw_queue)
    chan.connection.close()
    return rates("status events applied", count, service_seconds, raw_seconds,
                 "raw pika consume+ack", prefetch=settings.consumer_prefetch)


def applied(runtime: Runtime) -> float:
    return runtime.metrics.registry.get_sample_value(
        "flow_repository_events_consumed_total",
        {"name": "flow.started", "outcome": "applied"}) or 0


def raw_consume(settings: Settings, queue: str, count: int) -> float:
    """Seconds a plain consume+ack loop (same prefetch) takes to drain ``count`` messages."""
    chan = channel(settings)
    chan.basic_qos(prefetch_count=settings.consumer_prefetch)
    seen = 0

    def on_message(chan: Any, method: Any, properties: Any, body: bytes) -> None:
        nonlocal seen
        json.loads(body)  # as the service must: the body is only useful parsed
        chan.basic_ack(method.delivery_tag)
        seen += 1

    started = time.perf_counter()
    chan.basic_consume(queue, on_message)
    while seen < count:
        chan.connection.process_data_events(time_limit=0.1)
    seconds = time.perf_counter() - started
    chan.connection.close()
    return seconds


def measure_relay(settings: Settings, count: int) -> dict[str, Any]:
    runtime = Runtime.build(settings)
    seed(runtime, count, start=False)
    pending, _ = runtime.store.outbox_backlog()
    print(f"relay: a backlog of {pending} creation events", flush=True)
    sink = harness.unique_name("relay-sink")  # durable, so the broker confirms after storing
    chan = channel(settings)
    chan.exchange_declare(settings.event_exchange, "topic", durable=True)
    chan.queue_declare(sink, durable=True)
    chan.queue_bind(sink, settings.event_exchange, routing_key="#")
    chan.connection.close()  # an idle connection would miss its heartbeats meanwhile
    publisher = Publisher(settings.queue_url, settings.event_exchange)
    relay = OutboxRelay(runtime.store, publisher, lease_seconds=settings.relay_lease_seconds)
    publisher.connect()
    started = time.perf_counter()
    published = relay.publish_pending()
    relay_seconds = time.perf_counter() - started
    publisher.close()
    if published != pending or runtime.store.outbox_backlog()[0]:
        raise RuntimeError(f"relay published {published} of {pending} events")
    chan = channel(settings)
    while ready_messages(chan, sink) < pending:
        time.sleep(0.05)
    _, _, body = chan.basic_get(sink, auto_ack=True)  # one as the relay sent it
    chan.queue_purge(sink)

    raw_seconds = raw_publish(settings, body, pending)
    chan.queue_delete(sink)
    chan.connection.close()
    return rates("creation events relayed", pending, relay_seconds, raw_seconds,
                 "raw pika publish with per-message confirms", messageBytes=len(body))


def raw_publish(settings: Settings, body: bytes, count: int) -> float:
    """Seconds a plain publisher waiting for each confirm takes to send ``count`` messages."""
    chan = channel(settings)
    chan.confirm_delivery()
    started = time.perf_counter()
    for _ in range(count):
        chan.basic_publish(settings.event_exchange, "flowrepo.flow.created", body, PERSISTENT)
    seconds = time.perf_counter() - started
    chan.connection.close()
    return seconds


def rates(what: str, count: int, service_seconds: float, raw_seconds: float, raw: str,
          **extra: Any) -> dict[str, Any]:
    service_rate = count / service_seconds
    raw_rate = count / raw_seconds
    return {"what": what, "messages": count, "perSecond": round(service_rate, 1),
            "baseline": raw, "baselinePerSecond": round(raw_rate, 1),
            "ratio": round(service_rate / raw_rate, 3), "target": TARGET_RATIO,
            "met": service_rate / raw_rate >= TARGET_RATIO, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000,
                        help="status events the consumer applies (and the raw loop drains)")
    parser.add_argument("--backlog", type=int, default=10000,
                        help="creation events the relay drains (and the raw publisher sends)")
    parser.add_argument("--mongodb-url", default=None,
                        help="a MongoDB server (a database of its own is used and dropped); "
                             "unset: the embedded store")
    parser.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    parser.add_argument("--output",
                        default=str(harness.BENCH_DIR / "results" / "throughput.json"))
    arguments = parser.parse_args()

    database, url = harness.own_database(arguments.mongodb_url, "throughput")
    workdir = Path(tempfile.mkdtemp(prefix="flow-repository-throughput-"))
    environment = {key: value for key, value in os.environ.items() if key != "MONGODB_URL"}
    environment.update(QUEUE_URL=harness.QUEUE_URL, EVENT_QUEUE_TYPE=arguments.queue_type)
    results = {}
    for part, count, measure in (("consumer", arguments.events, measure_consumer),
                                 ("relay", arguments.backlog, measure_relay)):
        settings = Settings.from_env(environment, mongodb_url=url,
                                     embedded_db_path=str(workdir / f"{part}.sqlite3"),
                                     event_exchange=harness.unique_name(f"{part}-exchange"),
                                     event_queue=harness.unique_name(f"{part}-queue"))
        try:
            results[part] = measure(settings, count)
        finally:
            harness.delete_broker_objects(settings.event_exchange, [
                settings.event_queue, dead_letter_queue(settings.event_queue)])
            if url:
                harness.drop_mongodb_database(arguments.mongodb_url, database)
    report = {"benchmark": "bench/throughput.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "store": "MongoDB at --mongodb-url" if url else "embedded (MONGODB_URL unset)",
              "queueType": arguments.queue_type, **results}
    lines = ["| measured | messages | per second | baseline | per second | ratio | met |",
             "|---|---:|---:|---|---:|---:|---|"]
    for row in results.values():
        lines.append(f"| {row['what']} | {row['messages']} | {row['perSecond']} | "
                     f"{row['baseline']} | {row['baselinePerSecond']} | {row['ratio']} "
                     f"(target {row['target']}) | {'yes' if row['met'] else 'NO'} |")
    return harness.finish(report, arguments.output, "\n".join(lines), workdir, False)


if __name__ == "__main__":
    sys.exit(main())
