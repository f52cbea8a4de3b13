"""The embedded default keeps what it answered: ``serve`` (two gunicorn workers on the SQLite
file) SIGKILLed under write load, restarted, every change answered 2xx is stored and its
event reaches the broker."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

import pytest
import requests
from bson import ObjectId

from flow_repository.adapters.store import SqliteFlowStore
from support import Served, bearer, child_pids, eventually

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

WRITERS = 4


def processes_of(served: Served) -> list[int]:
    """The gunicorn master and its workers (children), to be killed together."""
    return [served.process.pid, *child_pids(served.process.pid)]


def test_a_serve_killed_under_write_load_keeps_every_answered_change(
        serve, iam: FakeIam, listener, settings, flow_body) -> None:
    if settings.mongodb_url:
        pytest.skip("the embedded store's durability; MongoDB keeps its data itself")
    events = listener("flowrepo.flow.created", "flowrepo.flow.modified")
    headers = bearer(iam.grant("crash-user", "tenant-c"))
    api = serve(WEB_CONCURRENCY="2")
    created: list[str] = []  # every flow whose creation was answered 201
    revisions: dict[str, int] = {}  # flow id -> revision of its last change answered 200
    patches: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def write(number: int) -> None:
        session = requests.Session()
        try:
            while not stop.is_set():
                answer = session.post(api.url("/flows"), headers=headers, timeout=10,
                                      json=flow_body(f"w{number}"))
                if answer.status_code != 201:
                    continue
                flow_id = answer.json()["data"]["id"]
                with lock:
                    created.append(flow_id)
                    revisions[flow_id] = answer.json()["data"]["revision"]
                for change in range(2):
                    answer = session.patch(api.url(f"/flows/{flow_id}"), headers=headers,
                                           timeout=10, json={"name": f"w{number} {change}"})
                    if answer.status_code == 200:
                        with lock:
                            revisions[flow_id] = answer.json()["data"]["revision"]
                            patches[flow_id] += 1
        except requests.RequestException:
            pass  # the server is gone: whatever was not answered may or may not be kept
        finally:
            session.close()

    writers = [threading.Thread(target=write, args=(number,)) for number in range(WRITERS)]
    for writer in writers:
        writer.start()
    eventually(lambda: len(created) >= 40, timeout=60, message="40 flows created")
    for pid in processes_of(api):
        os.kill(pid, signal.SIGKILL)
    api.process.wait(10)
    stop.set()
    for writer in writers:
        writer.join(30)
    with lock:
        answered = dict(revisions)
        answered_patches = dict(patches)
    assert answered_patches, "the load changed flows as well as creating them"

    again = serve(WEB_CONCURRENCY="2")  # the same file, a new port
    store = SqliteFlowStore.open(settings.embedded_database)
    try:
        for flow_id, revision in answered.items():
            stored = again.get(f"/flows/{flow_id}", headers=headers)
            assert stored.status_code == 200, (flow_id, stored.text)
            # one more is possible: a change written whose answer the kill cut off
            assert stored.json()["data"]["revision"] in (revision, revision + 1), flow_id

        def delivered() -> bool:
            seen = Counter(message.flow_id for message in events.events(
                "flowrepo.flow.modified"))
            made = {message.flow_id for message in events.events("flowrepo.flow.created")}
            return (set(answered) <= made
                    and all(seen[flow_id] >= count
                            for flow_id, count in answered_patches.items()))

        eventually(delivered, timeout=60, message="every answered change's event published")
        eventually(lambda: store.outbox_backlog()[0] == 0, timeout=30,
                   message="the outbox emptied")
        assert all(store.raw(ObjectId(flow_id))["outbox"] == [] for flow_id in answered)
    finally:
        store.close()
