"""GET /flows/events through a served process: tenants, resuming, the CLI, SIGTERM and a
reader that stops reading."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from flow_repository.client.rest import FlowRepositoryClient
from support import EXECUTABLE, bearer, eventually, open_event_stream

from .conftest import FakeIam

pytestmark = pytest.mark.e2e


def test_a_tenant_sees_its_own_create_and_patch_and_resumes_after_the_first(
        serve, iam: FakeIam, flow_body) -> None:
    api = serve()
    alice = FlowRepositoryClient(api.base_url, iam.grant("alice", "acme"))
    bob = FlowRepositoryClient(api.base_url, iam.grant("bob", "globex"))
    created: dict[str, str] = {}

    def edit() -> None:
        theirs = bob.create(flow_body("theirs")).flow
        ours = alice.create(flow_body("ours")).flow
        created["id"] = ours["id"]
        bob.update(theirs["id"], {"name": "theirs, renamed"})
        alice.update(ours["id"], {"name": "ours, renamed"})

    changes = alice.watch(timeout=30)
    editor = threading.Timer(0.5, edit)  # once the stream is open (at the first next())
    editor.start()
    first, second = next(changes), next(changes)
    changes.close()
    editor.join()
    assert [(c.event, c.flow_id, c.revision, c.status) for c in (first, second)] == [
        ("created", created["id"], 1, "inactive"), ("modified", created["id"], 2, "inactive")]

    resumed = alice.watch(last_event_id=first.id, timeout=30)
    again = next(resumed)
    resumed.close()
    assert (again.id, again.event, again.revision) == (second.id, "modified", 2)
    with FlowRepositoryClient(api.base_url, iam.grant("carol", "acme")) as carol:
        tenant_mate = carol.watch(last_event_id="0", timeout=30)  # same tenant: sees both
        assert [next(tenant_mate).id, next(tenant_mate).id] == [first.id, second.id]
        tenant_mate.close()


def test_flows_watch_prints_one_line_per_change(serve, iam: FakeIam, flow_body) -> None:
    api = serve()
    token = iam.grant("alice", "acme")
    client = FlowRepositoryClient(api.base_url, token)
    flow = client.create(flow_body("watched")).flow
    client.update(flow["id"], {"name": "watched, renamed"})
    client.start(flow["id"])
    command = [str(EXECUTABLE), "flows", "watch", "--url", api.base_url, "--token", token,
               "--since", "0"]
    as_json = subprocess.run([*command, "-o", "json", "--count", "3"], capture_output=True, check=False,
                             text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(line["event"], line["id"], line["revision"], line["status"]) for line in lines] == [
        ("created", flow["id"], 1, "inactive"), ("modified", flow["id"], 2, "inactive"),
        ("status", flow["id"], 3, "starting")]
    assert all(line["eventId"].isdigit() for line in lines)
    table = subprocess.run([*command, "--status", "starting", "--count", "1"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert table.returncode == 0, table.stderr
    [line] = table.stdout.splitlines()
    assert line.split()[:5] == [lines[2]["eventId"], "status", flow["id"], "r3", "starting"]
    refused = subprocess.run([*command[:-2], "--since", "x1", "--count", "1"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 5 and "Last-Event-ID" in refused.stderr


def test_streams_end_cleanly_on_sigterm(serve, iam: FakeIam) -> None:
    api = serve(GUNICORN_GRACEFUL_TIMEOUT="20")
    sock = open_event_stream(api.port, iam.grant("alice", "acme"))
    signalled = time.monotonic()
    api.process.send_signal(signal.SIGTERM)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    sock.close()
    assert b": the server is stopping; reconnect with Last-Event-ID" in received
    assert received.endswith(b"0\r\n\r\n")  # the chunked body ends: a clean end of stream
    assert api.terminate(20) == 0
    assert time.monotonic() - signalled < 10, "an open stream must not hold the shutdown"


def test_a_reader_that_stops_reading_is_dropped(serve, iam: FakeIam, flow_body) -> None:
    # one gunicorn worker: the bound per caller is per process
    api = serve(WATCH_SEND_TIMEOUT_SECONDS="1", MAX_WATCHERS_PER_CALLER="1",
                WEB_CONCURRENCY="1")
    token = iam.grant("alice", "acme")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", api.port))
    stalled.sendall(f"GET /flows/events?include=flow HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:  # its stream is open: from now on it only stops reading
        head += stalled.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head

    def refused() -> bool:  # a stream the probe opened by mistake must not block it
        response = requests.get(api.url("/flows/events"), headers=bearer(token), stream=True,
                                timeout=10)
        response.close()
        return response.status_code == 429

    eventually(refused, 10, message="the stalled stream to count")
    big = flow_body("big", flowSettings={"blob": "x" * 900_000})
    flow = api.request("POST", "/flows", headers=bearer(token), json=big).json()["data"]
    for number in range(12):  # megabytes of events the stalled reader does not take
        api.request("PATCH", f"/flows/{flow['id']}", headers=bearer(token),
                    json={"name": f"big {number}"})

    def freed() -> bool:
        response = requests.get(api.url("/flows/events"), headers=bearer(token), stream=True,
                                timeout=10)
        response.close()
        return response.status_code == 200

    eventually(freed, 30, message="the stalled reader to be dropped")
    stalled.close()


def test_resuming_works_across_api_processes_and_a_restart(serve, iam: FakeIam,
                                                           flow_body) -> None:
    """Two ``serve`` processes on one database (the embedded file, or MongoDB with
    --mongodb=secantus): ids order the changes of both, and a third process started after
    one stopped resumes where the client left off."""
    first, second = serve(), serve()
    token = iam.grant("alice", "acme")
    through_first = FlowRepositoryClient(first.base_url, token)
    through_second = FlowRepositoryClient(second.base_url, token)
    flow = through_first.create(flow_body("shared")).flow
    through_second.update(flow["id"], {"name": "second"})
    through_first.update(flow["id"], {"name": "third"})
    changes = through_second.watch(last_event_id="0", timeout=30)
    seen = [next(changes) for _ in range(3)]
    changes.close()
    assert [(change.event, change.revision) for change in seen] == [
        ("created", 1), ("modified", 2), ("modified", 3)]
    assert [int(change.id) for change in seen] == sorted(int(change.id) for change in seen)
    assert second.terminate(20) == 0
    third = serve()
    through_first.update(flow["id"], {"name": "fourth"})
    resumed = FlowRepositoryClient(third.base_url, token).watch(last_event_id=seen[-1].id,
                                                                timeout=30)
    after = next(resumed)
    resumed.close()
    assert (after.event, after.revision) == ("modified", 4)
    assert int(after.id) > int(seen[-1].id)
