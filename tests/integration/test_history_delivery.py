"""History is as reliable as the change: broker cut, a process killed after the write, dry runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bson import ObjectId

from flow_repository.adapters.store import FlowStore
from support import eventually

pytestmark = pytest.mark.integration

KILLED_AFTER_THE_WRITE = textwrap.dedent('''
    """Child process: applies a PATCH, then is SIGKILLed before its history entry is written."""
    import os
    import signal
    import sys

    from flow_repository.adapters.auth import Principal
    from flow_repository.server.bootstrap import Runtime
    from flow_repository.services.recorder import HistoryRecorder
    from flow_repository.settings import Settings

    def killed(self, flow):
        os.kill(os.getpid(), signal.SIGKILL)

    HistoryRecorder._record_history_after_write = killed
    runtime = Runtime.build(Settings.from_env())
    caller = Principal("user-1", "tenant-1", frozenset({"flows.write"}), False)
    runtime.service.update(caller, sys.argv[1], {"name": "written by the killed process"})
''')


def revisions(driver, flow_id: str) -> list[dict]:
    response = driver.client.get(f"/flows/{flow_id}/revisions", headers=driver.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]


def test_history_is_written_while_the_broker_is_cut_and_events_follow_later(
    make_app, settings, broker_proxy, drive, listener, store
) -> None:
    events = listener("flowrepo.flow.*")
    driver = drive(make_app(settings.replace(queue_url=broker_proxy.url(settings.queue_url))))
    flow_id = driver.create()
    events.wait("flowrepo.flow.created", flow_id)
    # confirmed and dropped, so the cut cannot take its confirm away (at least once)
    eventually(lambda: store.raw(ObjectId(flow_id))["outbox"] == [])
    broker_proxy.cut()

    patched = driver.client.patch(f"/flows/{flow_id}", json={"name": "during the cut"},
                                  headers=driver.headers)
    assert patched.status_code == 200
    restored = driver.client.post(f"/flows/{flow_id}/restore", json={"revision": 1},
                                  headers=driver.headers)
    assert restored.status_code == 200
    assert [(entry["revision"], entry["change"]) for entry in revisions(driver, flow_id)] == [
        (3, "restored"), (2, "updated"), (1, "created")]
    pending = [event["name"] for event in store.raw(ObjectId(flow_id))["outbox"]]
    assert pending == ["flowrepo.flow.modified", "flowrepo.flow.modified"]
    deleted = driver.client.delete(f"/flows/{flow_id}", headers=driver.headers)
    assert deleted.status_code == 200
    assert store.history.page(ObjectId(flow_id), 1, 10)[1] == 3  # the deletion is not out

    broker_proxy.restore()
    events.wait("flowrepo.flow.deleted", flow_id, timeout=30)
    assert [m.routing_key for m in events.events(flow_id=flow_id)][-1] == "flowrepo.flow.deleted"
    eventually(lambda: store.raw(ObjectId(flow_id)) is None, timeout=10,
               message="tombstone removed")
    assert store.history.page(ObjectId(flow_id), 1, 10) == ([], 0)


def test_a_dry_run_publishes_nothing(make_app, drive, listener, store) -> None:
    events = listener("flowrepo.flow.*")
    driver = drive(make_app())
    flow_id = driver.create()
    events.wait("flowrepo.flow.created", flow_id)
    for request in (
        lambda: driver.client.patch(f"/flows/{flow_id}?dryRun=true", json={"name": "dry"},
                                    headers=driver.headers),
        lambda: driver.client.post("/flows/validate", json=driver.flow_body(),
                                   headers=driver.headers),
        lambda: driver.client.post("/flows?dryRun=true", json=driver.flow_body(),
                                   headers=driver.headers),
    ):
        assert request().status_code == 200
    # A real change afterwards: its event is the next one on the bus (a flow's events are
    # published in order), so had a dry run queued anything, it would show up before it.
    patched = driver.client.patch(f"/flows/{flow_id}", json={"name": "real"},
                                  headers=driver.headers)
    assert patched.status_code == 200
    events.wait("flowrepo.flow.modified", flow_id)
    assert [m.routing_key for m in events.events()] == ["flowrepo.flow.created",
                                                        "flowrepo.flow.modified"]
    assert driver.get(flow_id)["revision"] == 2


def test_a_process_killed_between_the_change_and_its_history_loses_no_entry(
    make_app, settings, drive, store, tmp_path: Path
) -> None:
    if not settings.mongodb_url and isinstance(store, FlowStore):
        pytest.skip("two processes share a database on a real MongoDB or the embedded "
                    "SQLite file, not on mongomock")
    driver = drive(make_app(background=False))
    flow_id = driver.create()
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_THE_WRITE)
    env = {key: value for key, value in os.environ.items() if key != "MONGODB_URL"}
    if settings.mongodb_url:
        env["MONGODB_URL"] = settings.mongodb_url
    env.update(EMBEDDED_DB_PATH=settings.embedded_db_path, QUEUE_URL=settings.queue_url,
               EVENT_EXCHANGE=settings.event_exchange, LOG_LEVEL="WARNING",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    child = subprocess.run([sys.executable, str(script), flow_id], env=env, timeout=120,
                           check=False,
                           capture_output=True, text=True)
    assert child.returncode == -9, child.stderr  # killed right after its write
    raw = store.raw(ObjectId(flow_id))
    assert raw["name"] == "written by the killed process" and raw["revision"] == 2
    if store.history_with_change:  # SQLite: the entry was committed with the change
        assert "historyOutbox" not in raw
    else:
        assert [entry["change"] for entry in raw["historyOutbox"]] == ["updated"]

    entries = revisions(driver, flow_id)  # any reader records what the dead writer left
    assert [(entry["revision"], entry["flow"]["name"]) for entry in entries] == [
        (2, "written by the killed process"), (1, "My flow")]
    assert not store.raw(ObjectId(flow_id)).get("historyOutbox")
