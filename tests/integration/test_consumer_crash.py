"""A consumer process killed mid-message, and the standalone worker run as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from bson import ObjectId

from flow_repository.adapters.auth import Principal
from flow_repository.entrypoints.consumer import StatusConsumer
from flow_repository.server.bootstrap import Runtime
from support import eventually, free_port

pytestmark = pytest.mark.integration

BLOCKING_CONSUMER = textwrap.dedent('''
    """Child process: a real StatusConsumer whose service blocks forever inside the handler."""
    import json
    import sys
    import time
    from pathlib import Path

    from flow_repository.server.metrics import Metrics
    from flow_repository.settings import Settings
    from flow_repository.entrypoints.consumer import StatusConsumer

    marker = Path(sys.argv[1])


    class BlockingService:
        def apply_status_event(self, name, payload):
            # written aside then renamed, so the parent never reads a half-written file
            partial = marker.with_suffix(".partial")
            partial.write_text(json.dumps({"name": name, "payload": payload}))
            partial.rename(marker)
            time.sleep(3600)  # the parent SIGKILLs us here, before any ack

        def remove_owner(self, owner_id):
            self.apply_status_event("owner", {"id": owner_id})


    StatusConsumer(Settings.from_env(), BlockingService(), Metrics()).run()
''')


def child_environment(settings, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MONGODB_URL"}
    env.update(QUEUE_URL=settings.queue_url, EVENT_EXCHANGE=settings.event_exchange,
               EVENT_QUEUE=settings.event_queue, LOG_LEVEL="WARNING",
               DEV_TOKEN_SECRET_FILE=settings.dev_token_secret_file or "",
               # the test's own database file, never the user's default one
               EMBEDDED_DB_PATH=settings.embedded_db_path,
               PYTHONPATH=str(Path(__file__).resolve().parents[2]), **extra)
    if settings.mongodb_url:
        env["MONGODB_URL"] = settings.mongodb_url
    return env


class RecordingConsumer(StatusConsumer):
    """The real consumer, noting the redelivered flag of every message it is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, bool]] = []
        self._seen_lock = threading.Lock()

    def _on_message(self, channel, method, properties, body) -> None:
        with self._seen_lock:
            self.seen.append((method.routing_key, method.redelivered))
        super()._on_message(channel, method, properties, body)


def test_message_in_hand_of_a_killed_consumer_is_redelivered_and_applied_once(
        settings, store, bus, tmp_path):
    """SIGKILL a consumer process mid-message; a fresh consumer applies the message once.

    What the guarantee rests on is the consumer's protocol with RabbitMQ (ack only after the
    database write, so an unacked message returns to the queue when its connection dies)
    plus idempotent handlers. So the killed process here runs the real StatusConsumer over
    the network, with a service that blocks inside the handler (the point where a crash
    would otherwise lose the message), and the survivor is the real consumer on the real
    service and store of this test. Real ``worker`` processes killed mid-stream on a shared
    MongoDB: tests/e2e/test_worker_kill.py.
    """
    runtime = Runtime.build(settings, store=store)
    owner = Principal(sub="user-1", tenant="tenant-1", permissions=frozenset(), is_admin=False)
    flow_id = runtime.service.create(owner, {"name": "Crash", "graph": {"nodes": [
        {"id": "a", "componentId": "0" * 23 + "1", "function": "run"}], "edges": []}}).flow["id"]
    runtime.service.start(owner, flow_id)
    before = store.raw(ObjectId(flow_id))
    assert before["status"] == "starting"

    script = tmp_path / "blocking_consumer.py"
    script.write_text(BLOCKING_CONSUMER)
    marker = tmp_path / "in-handler.json"
    child = subprocess.Popen([sys.executable, str(script), str(marker)],
                             env=child_environment(settings), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        bus.wait_consumers(1, timeout=30)
        bus.publish("flow.started", flow_id)
        eventually(marker.exists, timeout=15, message="child is inside the handler")
        assert json.loads(marker.read_text()) == {"name": "flow.started",
                                                  "payload": {"id": flow_id}}
        assert bus.queue_state() == (0, 1)  # delivered to the child, not acked
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stderr.close()

    eventually(lambda: bus.queue_state() == (1, 0), message="message back in the queue")
    assert store.raw(ObjectId(flow_id))["revision"] == before["revision"]  # nothing applied

    consumer = RecordingConsumer(settings, runtime.service, runtime.metrics)
    consumer.start()
    try:
        after = eventually(lambda: (doc := store.raw(ObjectId(flow_id)))["status"] == "active"
                           and doc)
        eventually(lambda: bus.queue_state() == (0, 1), message="message acked")
        assert consumer.seen == [("flow.started", True)]  # the very message, redelivered
        assert after["revision"] == before["revision"] + 1
        assert after["statusReason"] == "orchestrator reported started"

        bus.publish("flow.started", flow_id)  # the orchestrator repeats itself: harmless
        eventually(lambda: len(consumer.seen) == 2 and bus.queue_state() == (0, 1))
        assert store.raw(ObjectId(flow_id))["revision"] == before["revision"] + 1
        assert store.raw(ObjectId(flow_id))["status"] == "active"
    finally:
        consumer.stop()
    assert bus.queue_state(bus.dead_letter_queue) == (0, 0)


def test_standalone_worker_process_consumes_survives_sigkill_and_stops_on_sigterm(
        settings, bus, tmp_path):
    """The real ``flow-repository worker`` command, as deployed, against the real broker.

    No flow exists in its store, so what can be observed from outside is the broker
    side: it declares and binds its queue, acks what it handled, dead-letters garbage,
    answers its health port, leaves messages published while it is dead in the durable
    queue for its successor, and exits cleanly on SIGTERM.
    """
    command = [str(Path(sys.executable).parent / "flow-repository"), "worker"]
    assert Path(command[0]).exists()

    def launch():
        port = free_port()
        process = subprocess.Popen(command, env=child_environment(
            settings, WORKER_HEALTH_PORT=str(port)), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        return process, port

    def get(port: int, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    first, port = launch()
    try:
        bus.wait_consumers(1, timeout=30)  # the worker declared and bound the queue itself
        _, health = eventually(lambda: (answer := get(port, "/healthcheck"))[0] == 200
                                    and answer, timeout=15)
        assert health["status"] == "pass"
        assert health["details"]["queue"]["connected"] is True
        assert get(port, "/livez") == (200, {"status": "pass"})

        bus.publish("flow.started", ObjectId())  # unknown flow: handled, acked
        bus.publish("flow.stopped", raw=b"not json")  # garbage: dead-lettered
        [dead] = eventually(bus.dead_letters, timeout=15)
        assert dead.raw == b"not json"
        assert dead.properties.headers["x-death-reason"] == "body is not JSON"
        eventually(lambda: bus.queue_state() == (0, 1), message="worker took its messages")

        first.kill()
        assert first.wait(10) == -signal.SIGKILL
        # Its acks go out in batches, so what it had not acked yet when killed goes back to
        # the queue, for its successor (a passive declare counts ready messages only: the
        # (0, 1) above did not mean they were acked).
        eventually(lambda: bus.consumers() == 0, message="consumer gone")
        requeued = bus.queue_state()[0]
        assert requeued <= 2  # at most the two it was sent
        bus.publish("flow.failed", raw=b"{}")  # published while no worker runs
        assert bus.queue_state() == (requeued + 1, 0)  # kept in the durable queue

        second, port = launch()
        try:
            letters: list = []
            eventually(lambda: letters.extend(bus.dead_letters())
                       or b"{}" in [letter.raw for letter in letters], timeout=30)
            [kept] = [letter for letter in letters if letter.raw == b"{}"]
            assert kept.properties.headers["x-original-routing-key"] == "flow.failed"
            # anything else dead-lettered is the garbage the first one died before acking
            assert all(letter.raw == b"not json" for letter in letters if letter is not kept)
            assert len(letters) <= 2
            eventually(lambda: bus.queue_state() == (0, 1))
            eventually(lambda: get(port, "/healthcheck")[0] == 200, timeout=15)
            started = time.monotonic()
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
            assert time.monotonic() - started < 15
            eventually(lambda: bus.queue_state() == (0, 0), message="consumer cancelled")
        finally:
            if second.poll() is None:
                second.kill()
                second.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)


class StoppingConsumer(StatusConsumer):
    """The real consumer, asked to stop from inside its handler of the last expected report
    (so its loop ends right after that burst, before another turn could send anything)."""

    def __init__(self, *args, expected: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.handled = 0

    def handle(self, name: str, body: bytes) -> str:
        outcome = super().handle(name, body)
        self.handled += 1
        if self.handled == self.expected:
            self._stop.set()
        return outcome


def test_a_consumer_stopped_right_after_a_burst_has_acknowledged_all_of_it(
        settings, store, bus):
    """Acks are queued, not flushed one by one: those of the last burst still go out
    before the stopping consumer drops its connection, so nothing applied comes back."""
    runtime = Runtime.build(settings, store=store)
    owner = Principal(sub="user-1", tenant="tenant-1", permissions=frozenset(), is_admin=False)
    flow_ids = []
    for number in range(20):
        flow_id = runtime.service.create(owner, {"name": f"Burst {number}", "graph": {
            "nodes": [{"id": "a", "componentId": "0" * 23 + "1", "function": "run"}],
            "edges": []}}).flow["id"]
        runtime.service.start(owner, flow_id)
        flow_ids.append(flow_id)
    consumer = StoppingConsumer(settings, runtime.service, runtime.metrics,
                                expected=len(flow_ids))
    consumer.start()
    try:
        bus.wait_consumers(1)
        for flow_id in flow_ids:
            bus.publish("flow.started", flow_id)
        eventually(lambda: not consumer.alive, timeout=30, message="consumer stopped")
    finally:
        consumer.stop()
    assert [store.raw(ObjectId(flow_id))["status"] for flow_id in flow_ids] == \
        ["active"] * len(flow_ids)
    assert bus.queue_state() == (0, 0)  # every report acked before the connection went
