"""A bounded fault run on the production topology: random commands and orchestrator reports
while a worker and an API process are SIGKILLed and the broker is cut once; then every
invariant the service promises is checked and the counts are printed."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
import requests
from bson import ObjectId

from support import Bus, Listener, bearer, child_pids, eventually

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

DRIVE_SECONDS = float(os.environ.get("FAULT_RUN_SECONDS", "40"))
CLIENTS = 4
TIMEOUT_SECONDS = 20  # START/STOP_TIMEOUT_SECONDS: longer than the broker cut
CUT_SECONDS = 4


@dataclass
class Ledger:
    """What the clients were answered, and what the orchestrator decided, per flow."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[tuple[float, str, int]] = field(default_factory=list)
    no_answer: int = 0
    revisions: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    last_command: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    flows: list[str] = field(default_factory=list)
    # flow -> the command whose answer the client never got (no answer: its API process
    # was killed mid-request; or a 5xx): applied or not, the client cannot tell
    unanswered: dict[str, str] = field(default_factory=dict)

    def commanded(self, flow_id: str, action: str, answer: requests.Response | None,
                  ok: tuple[int, ...]) -> bool:
        """Note a command's answer; whether it was applied for sure."""
        with self.lock:
            if answer is not None and answer.status_code in ok:
                self.unanswered.pop(flow_id, None)
                return True
            if answer is None or answer.status_code >= 500:
                self.unanswered[flow_id] = action
            return False

    def answered(self, what: str, status: int, at: float) -> None:
        with self.lock:
            self.statuses[(what, status)] += 1
            if status >= 500:
                self.server_errors.append((at, what, status))


class Orchestrator:
    """Answers flow.starting with flow.started (one in eight with flow.failed) and
    flow.stopping with flow.stopped, straight on the broker (not through the cut)."""

    def __init__(self, settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._random = random.Random(7)
        self.answers: Counter = Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self._settings.queue_url))
        self._channel = connection.channel()
        self._channel.exchange_declare(self._settings.event_exchange, "topic", durable=True)
        self._queue = self._channel.queue_declare("", exclusive=True).method.queue
        for key in ("flow.starting", "flow.stopping"):
            self._channel.queue_bind(self._queue, self._settings.event_exchange, key)
        self._connection = connection
        self._thread.start()

    def _run(self) -> None:
        publisher = pika.BlockingConnection(pika.URLParameters(self._settings.queue_url))
        channel = publisher.channel()
        seen: set[str] = set()
        while not self._stop.is_set():
            method, _, body = self._channel.basic_get(self._queue, auto_ack=True)
            if method is None:
                self._connection.sleep(0.02)
                continue
            message = json.loads(body)
            event_id = message["headers"]["eventId"]
            flow_id = message["payload"]["id"]
            if event_id in seen:
                continue  # a re-publication (at least once): answered already
            seen.add(event_id)
            if method.routing_key == "flow.starting":
                answer = "flow.failed" if self._random.random() < 0.125 else "flow.started"
            else:
                answer = "flow.stopped"
            self.answers[answer] += 1
            envelope = {"headers": {"name": answer, "createdAt": int(time.time() * 1000),
                                    "serviceName": "component-orchestrator"},
                        "payload": {"id": flow_id}}
            channel.basic_publish(self._settings.event_exchange, answer,
                                  json.dumps(envelope).encode())
        publisher.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._connection.close()


def test_a_fault_run_keeps_every_promise(deploy, settings, iam: FakeIam, bus: Bus, listener,
                                         broker_proxy, shared_store, flow_body) -> None:
    if settings.embedded and settings.embedded_database == ":memory:":
        pytest.skip("several processes need a database file or a MongoDB to share")
    changes: Listener = listener("flowrepo.flow.*")
    ledger = Ledger()
    deployment = deploy(
        workers=2, apis=2, QUEUE_URL=broker_proxy.url(settings.queue_url),
        RELAY_LEASE_SECONDS="2", RECONCILE_INTERVAL_SECONDS="1",
        START_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS), STOP_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS))
    orchestrator = Orchestrator(settings)
    orchestrator.start()
    headers = bearer(iam.grant("fault-user", "tenant-f"))
    urls = [api.base_url for api in deployment.apis]
    stop_driving = threading.Event()
    outage = {"from": float("inf"), "to": float("inf")}

    def call(method: str, path: str, what: str, **kwargs: Any) -> requests.Response | None:
        url = random.choice(urls)
        try:
            answer = requests.request(method, url + path, headers=headers, timeout=30, **kwargs)
        except requests.RequestException:
            with ledger.lock:
                ledger.no_answer += 1  # an API process killed mid-request
            return None
        ledger.answered(what, answer.status_code, time.monotonic())
        return answer

    def drive(seed: int) -> None:
        rng = random.Random(seed)
        while not stop_driving.is_set():
            with ledger.lock:
                live = [f for f in ledger.flows if f not in ledger.deleted]
            action = rng.choice(["create", "patch", "patch", "start", "stop", "delete"]
                                if live else ["create"])
            if action == "create":
                answer = call("POST", "/flows", "create", json=flow_body(f"Fault {seed}"))
                if answer is not None and answer.status_code == 201:
                    flow_id = answer.json()["data"]["id"]
                    with ledger.lock:
                        ledger.flows.append(flow_id)
                        ledger.revisions[flow_id].add(1)
                continue
            flow_id = rng.choice(live)
            if action == "patch":
                answer = call("PATCH", f"/flows/{flow_id}", "patch",
                              json={"description": f"change {rng.random()}"})
                if answer is not None and answer.status_code == 200:
                    with ledger.lock:
                        ledger.revisions[flow_id].add(answer.json()["data"]["revision"])
            elif action in ("start", "stop"):
                answer = call("POST", f"/flows/{flow_id}/{action}", action)
                if ledger.commanded(flow_id, action, answer, (200,)):
                    with ledger.lock:
                        ledger.last_command[flow_id] = action
            else:
                answer = call("DELETE", f"/flows/{flow_id}", "delete")
                if ledger.commanded(flow_id, action, answer, (200, 204)):
                    with ledger.lock:
                        ledger.deleted.add(flow_id)

    drivers = [threading.Thread(target=drive, args=(seed,), daemon=True)
               for seed in range(CLIENTS)]
    for thread in drivers:
        thread.start()
    started = time.monotonic()
    try:
        time.sleep(DRIVE_SECONDS * 0.25)
        victim = deployment.workers[0]
        victim.process.send_signal(signal.SIGKILL)  # the active worker or the standby
        assert victim.process.wait(10) == -signal.SIGKILL
        time.sleep(DRIVE_SECONDS * 0.15)
        api_worker = child_pids(deployment.apis[1].process.pid)[0]
        os.kill(api_worker, signal.SIGKILL)  # its master starts another one
        time.sleep(DRIVE_SECONDS * 0.15)
        outage["from"] = time.monotonic()
        broker_proxy.cut()
        time.sleep(CUT_SECONDS)
        broker_proxy.restore()
        outage["to"] = time.monotonic()
        time.sleep(max(0.0, started + DRIVE_SECONDS - time.monotonic()))
    finally:
        stop_driving.set()
        for thread in drivers:
            thread.join(60)

    def settled() -> bool:
        pending = [f for f in ledger.flows if (raw := shared_store.raw(ObjectId(f))) is not None
                   and (raw.get("outbox") or raw["status"] in ("starting", "stopping"))]
        assert not pending, f"{len(pending)} flows still moving"
        assert all(shared_store.raw(ObjectId(f)) is None for f in ledger.deleted), "tombstones left"
        return True

    eventually(settled, 120, interval=1, message="every flow settled, every event out")
    orchestrator.stop()
    # a DELETE applied whose answer was lost: the flow went as every deleted flow goes
    lost_deletes = {flow_id for flow_id, action in ledger.unanswered.items()
                    if action == "delete" and shared_store.raw(ObjectId(flow_id)) is None}
    ledger.deleted |= lost_deletes
    live = [flow_id for flow_id in ledger.flows if flow_id not in ledger.deleted]

    # 1. each flow is where its last command and the orchestrator's answer put it
    finals = Counter()
    for flow_id in live:
        raw = shared_store.raw(ObjectId(flow_id))
        finals[raw["status"]] += 1
        last = ledger.last_command.get(flow_id)
        if ledger.unanswered.get(flow_id) in ("start", "stop"):
            continue  # applied or not: either settled status is the one it implies
        if last is None or last == "stop":
            assert raw["status"] == "inactive", (flow_id, last, raw["status"])
        elif raw["status"] != "active":  # started, then failed by the orchestrator
            assert raw["status"] == "inactive", (flow_id, raw["status"])
            assert raw["statusReason"] == "orchestrator reported stopped", raw["statusReason"]

    # 2. every answered change has its history revision, the live flows' history is whole,
    # as a user reads it: an entry whose recorder was killed after the change was written
    # (a worker amid a burst, an API process) waits in the flow's document, and the read
    # records it (read-repair); nothing else writes a flow whose last report was a repeat.
    repaired = 0
    for flow_id in live:
        raw = shared_store.raw(ObjectId(flow_id))
        repaired += bool(raw.get("historyOutbox"))
        answer = requests.get(f"{urls[0]}/flows/{flow_id}/revisions?page[size]=100",
                              headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        recorded = {entry["revision"] for entry in answer.json()["data"]}
        assert recorded == set(range(1, raw["revision"] + 1)), flow_id
        assert ledger.revisions[flow_id] <= recorded, flow_id
        assert not shared_store.raw(ObjectId(flow_id)).get("historyOutbox"), flow_id

    # 3. created, modified, deleted: each on the broker, per flow in revision order
    def published_all() -> bool:
        for flow_id in ledger.flows:
            messages = changes.events(flow_id=flow_id)
            order: list[str] = []
            for message in messages:
                if message.event_id not in order:
                    order.append(message.event_id)
            assert len(order) >= len(ledger.revisions[flow_id]), flow_id
        return True

    eventually(published_all, 60, interval=1, message="every change event on the broker")
    events_seen = 0
    for flow_id in ledger.flows:
        first_seen: dict[str, Any] = {}
        for message in changes.events(flow_id=flow_id):
            first_seen.setdefault(message.event_id, message)
        names = [m.routing_key for m in first_seen.values()]
        events_seen += len(names)
        assert names[0] == "flowrepo.flow.created", names
        revisions = [m.body["headers"].get("revision") for m in first_seen.values()
                     if m.routing_key != "flowrepo.flow.deleted"]
        assert revisions == sorted(revisions), (flow_id, revisions)
        assert set(revisions) >= ledger.revisions[flow_id], flow_id
        if flow_id in ledger.deleted:
            assert names[-1] == "flowrepo.flow.deleted", names
            assert names.count("flowrepo.flow.deleted") == 1

    # 4. no 5xx but a 503 during the outage
    for at, what, status in ledger.server_errors:
        assert status == 503 and outage["from"] <= at <= outage["to"] + 5, (what, status)

    print(f"fault run: {len(ledger.flows)} flows created, {len(ledger.deleted)} deleted, "
          f"final statuses {dict(finals)}; answers {dict(ledger.statuses)}; "
          f"{ledger.no_answer} requests unanswered (API process killed), "
          f"{len(lost_deletes)} DELETEs applied though unanswered; orchestrator "
          f"answers {dict(orchestrator.answers)}; {events_seen} change events checked; "
          f"{repaired} flows' history completed by reading it")
    assert len(ledger.flows) >= 20 and sum(ledger.statuses.values()) >= 100
