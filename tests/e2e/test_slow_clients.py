"""Slow and idle clients hold no request thread; the access log stays JSON whatever is sent."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
import requests

from support import Served, bearer, eventually, free_port, open_event_stream

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

STALLED = 180  # connections that send part of a request and go quiet
IDLE = 40  # connections that send nothing at all (220 in all, beyond the bound of 200)
PER_REQUEST_TIMEOUT = 10  # generous: answers normally take milliseconds


PARTIAL_REQUESTS = (
    b"G",
    b"GET /livez HTTP/1.1\r\nHost: x\r\n",  # the head never ends
    (b"POST /flows HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 500\r\n\r\n{\"name\": "),  # the body never ends
    b"POST /flows HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":",
)


def test_stalled_and_idle_connections_do_not_stop_other_requests(
    serve, iam: FakeIam, flow_body, client_sockets: list[socket.socket]
) -> None:
    # Two threads: on a stock gthread worker two stalled clients would already stop it.
    served = serve(GUNICORN_THREADS="2", GUNICORN_REQUEST_TIMEOUT="600")
    for index in range(STALLED):
        sock = served.connect(PER_REQUEST_TIMEOUT)
        sock.sendall(PARTIAL_REQUESTS[index % len(PARTIAL_REQUESTS)])
        client_sockets.append(sock)
    client_sockets.extend(served.connect(PER_REQUEST_TIMEOUT) for _ in range(IDLE))

    headers = bearer(iam.grant())
    for round_number in range(5):
        assert served.get("/livez", timeout=PER_REQUEST_TIMEOUT).status_code == 200
        created = served.request("POST", "/flows", headers=headers,
                                 json=flow_body(name=f"flow {round_number}"),
                                 timeout=PER_REQUEST_TIMEOUT)
        assert created.status_code == 201, created.text
        listed = served.get("/flows", headers=headers, timeout=PER_REQUEST_TIMEOUT)
        assert listed.status_code == 200
        assert listed.json()["meta"]["total"] == round_number + 1
    # The stalled ones are still connected, not merely dropped to make room.
    for sock in client_sockets:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)


def test_open_change_streams_and_stalled_clients_do_not_stop_other_requests(
    serve, iam: FakeIam, flow_body, client_sockets: list[socket.socket]
) -> None:
    # Two request threads and one gunicorn worker; six streams (each held for minutes)
    # beside stalled and idle connections: on the request threads, they would stop it all.
    streams = 6
    served = serve(WEB_CONCURRENCY="1", GUNICORN_THREADS="2", GUNICORN_REQUEST_TIMEOUT="600",
                   MAX_WATCHERS=str(streams), MAX_WATCHERS_PER_CALLER=str(streams))
    watcher = iam.grant("watcher", "tenant-1")
    opened = [open_event_stream(served.port, watcher) for _ in range(streams)]
    client_sockets.extend(opened)
    for index in range(40):
        sock = served.connect(PER_REQUEST_TIMEOUT)
        sock.sendall(PARTIAL_REQUESTS[index % len(PARTIAL_REQUESTS)])
        client_sockets.append(sock)
    headers = bearer(iam.grant("writer", "tenant-1"))
    for round_number in range(5):
        started = time.monotonic()
        assert served.get("/livez", timeout=PER_REQUEST_TIMEOUT).status_code == 200
        created = served.request("POST", "/flows", headers=headers,
                                 json=flow_body(name=f"flow {round_number}"),
                                 timeout=PER_REQUEST_TIMEOUT)
        assert created.status_code == 201, created.text
        assert time.monotonic() - started < 2
    beyond = served.get("/flows/events", headers=bearer(iam.grant("late", "tenant-1")),
                        timeout=PER_REQUEST_TIMEOUT)
    assert beyond.status_code == 503 and beyond.headers["Retry-After"]
    assert beyond.json()["errors"][0]["code"] == 503
    # every stream got the five creations (same tenant)
    for sock in opened:
        received = b""
        while received.count(b"event: created") < 5:
            received += sock.recv(65536)


def read_to_close(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(4096):  # the server closes the connection after answering
        answer += chunk
    return answer


def test_a_request_not_received_in_time_is_answered_408_and_closed(
    serve, client_sockets: list[socket.socket]
) -> None:
    served = serve(GUNICORN_REQUEST_TIMEOUT="1")
    partial, idle = served.connect(PER_REQUEST_TIMEOUT), served.connect(PER_REQUEST_TIMEOUT)
    client_sockets.extend((partial, idle))
    partial.sendall(b"POST /flows HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
    head, _, body = read_to_close(partial).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["errors"][0]["code"] == 408
    assert read_to_close(idle) == b""  # it asked nothing, so it is closed without an answer


def test_bodies_being_received_are_bounded_in_memory_together(
    serve, client_sockets: list[socket.socket]
) -> None:
    # 64 bodies of 4 KiB may be held at once by a worker; 80 nearly complete ones are more
    # than that (one gunicorn worker, so that all of them go to it).
    served = serve(WEB_CONCURRENCY="1", MAX_BODY_BYTES="4096", GUNICORN_REQUEST_TIMEOUT="600")
    for _ in range(80):
        sock = served.connect(PER_REQUEST_TIMEOUT)
        client_sockets.append(sock)
        sock.sendall(b"POST /flows HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n"
                     + b" " * 4000)
    # The worker accepts connections in arrival order and reads each one's bytes before it
    # serves a later connection, so once /livez is answered every refusal has been sent
    # (over loopback, a sent answer is already in the receiving socket).
    assert served.get("/livez", timeout=PER_REQUEST_TIMEOUT).status_code == 200
    refused = 0
    for sock in client_sockets:
        sock.setblocking(False)
        try:
            answer = sock.recv(4096)
        except BlockingIOError:
            continue  # still waiting for the rest of its body
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in answer
        refused += 1
    assert 0 < refused <= 80 - 60


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(
    serve, client_sockets: list[socket.socket]
) -> None:
    served = serve(MAX_BODY_BYTES="4096")
    sock = served.connect(PER_REQUEST_TIMEOUT)
    client_sockets.append(sock)
    sock.sendall(b"POST /flows HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    head, _, body = read_to_close(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "4096" in json.loads(body)["errors"][0]["message"]


def test_expect_100_continue_and_pipelined_requests_are_served(
    serve, client_sockets: list[socket.socket]
) -> None:
    served = serve()
    sock = served.connect(PER_REQUEST_TIMEOUT)
    client_sockets.append(sock)
    sock.sendall(b"POST /flows HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 2\r\n\r\n")
    assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
    # The body, then two pipelined requests, the second split across two sends.
    sock.sendall(b"{}GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /li")
    sock.sendall(b"vez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 401")  # no token: the POST was read and answered
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert b"100 Continue" not in answer  # sent once, not again by gunicorn


HOSTILE = "line\nbreak \"quoted\" back\\slash \x01\x1b ünïcödé \\"


def test_access_log_lines_are_json_whatever_the_request_holds(serve, iam: FakeIam) -> None:
    served = serve()
    token = iam.grant()
    requests_sent = [
        # Percent-encoded path and query: decoded by the server, so the log sees the raw text.
        b"GET /flows/%0A%22%5C%01%C3%BC%E2%80%A8?q=%0A%22%5C%01&x=\"\\ HTTP/1.1\r\n",
        # Raw non-ASCII bytes in the target (gunicorn refuses it; its error line is JSON too).
        "GET /fl\u00fcws?s=\u00e9\u2028 HTTP/1.1\r\n".encode(),
        b"GET /livez HTTP/1.1\r\n",
    ]
    header_values = {
        "User-Agent": "agent \"quoted\" ünï \\",
        "Referer": "http://example.com/\"\\ü",
        "X-Request-Id": "id-\"quoted\"-\\-ü",
    }
    headers = b"".join(f"{name}: {value}\r\n".encode() for name, value in header_values.items())
    for line in requests_sent:
        for extra in (b"", b"User-Agent: tab\there\r\n", b"X-Request-Id: ctl\x01\x7f\r\n"):
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
                sock.sendall(line + b"Host: x\r\nAuthorization: Bearer " + token.encode()
                             + b"\r\nConnection: close\r\n" + headers + extra + b"\r\n")
                while sock.recv(4096):
                    pass
    # One more through requests, so that the last access line is surely flushed.
    assert served.get("/livez", headers={"User-Agent": HOSTILE.replace("\n", " ")
                                         .replace("\x01", "").replace("\x1b", "")}
                      ).status_code == 200
    served.terminate(30)

    entries = []
    for path in (served.stdout_path, served.stderr_path):
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                entries.append(json.loads(raw))
            except ValueError:
                pytest.fail(f"{path.name} line {number} is not JSON: {raw!r}")
    access = [entry for entry in entries if "durationMs" in entry]
    paths = {entry["path"] for entry in access}
    assert "/flows/\n\"\\\x01\u00fc\u2028" in paths
    assert any(entry["query"] == "q=%0A%22%5C%01&x=\"\\" for entry in access)
    assert any(entry["userAgent"] == "agent \"quoted\" ünï \\" for entry in access)
    assert any(entry["referer"] == "http://example.com/\"\\ü" for entry in access)
    assert any(entry["requestId"] == "id-\"quoted\"-\\-ü" for entry in access)


def test_a_head_over_64_kib_is_refused_431_while_it_arrives(
    serve, client_sockets: list[socket.socket]
) -> None:
    served = serve()
    sock = served.connect(PER_REQUEST_TIMEOUT)
    client_sockets.append(sock)
    # Ten fields of 7 KB each: within gunicorn's per-field limits, never ending.
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n"
                 + b"".join(f"X-F{i}: ".encode() + b"a" * 7000 + b"\r\n" for i in range(10)))
    head, _, body = read_to_close(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")
    assert json.loads(body)["errors"][0]["code"] == 431


def hold_every_slot(served: Served, slots: int, stalled: list[socket.socket]) -> None:
    """Open stalled connections until ``slots`` of them hold the API's slots. One the server
    refused (answered 503 and closed: a slot was still held by a keep-alive connection of
    the readiness probe, gone since) is replaced."""
    while len(stalled) < slots:
        for index in range(len(stalled), slots):
            sock = served.connect(PER_REQUEST_TIMEOUT)
            sock.sendall(PARTIAL_REQUESTS[index % len(PARTIAL_REQUESTS)])
            stalled.append(sock)
        refused, _, _ = select.select(stalled, [], [], 0.5)  # a held one is never answered
        for sock in refused:
            stalled.remove(sock)
            sock.close()


def test_health_checks_answer_while_slow_clients_hold_every_slot(
    serve, client_sockets: list[socket.socket]
) -> None:
    """Issue 16: every API slot held by slow connections; the kubelet's port still answers,
    and a new API connection is refused at once with 503 instead of waiting."""
    slots = 30
    health_port = free_port()
    # one gunicorn worker: its slots are the ones filled (embedded serve runs two by default)
    served = serve(WEB_CONCURRENCY="1", GUNICORN_MAX_CONNECTIONS=str(slots), GUNICORN_THREADS="2",
                   GUNICORN_REQUEST_TIMEOUT="600", HEALTH_PORT=str(health_port))
    hold_every_slot(served, slots, client_sockets)
    health = f"http://127.0.0.1:{health_port}"
    for _ in range(3):
        assert requests.get(f"{health}/livez", timeout=2).status_code == 200
        assert requests.get(f"{health}/readyz", timeout=5).json()["status"] in ("pass", "warn")
    refused = requests.get(f"{health}/flows", timeout=2)
    assert refused.status_code == 404 and refused.json()["errors"][0]["code"] == 404

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = read_to_close(sock).partition(b"\r\n\r\n")
    assert time.monotonic() - started < 3
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["errors"][0]["code"] == 503

    for sock in client_sockets:  # slots free again: the API port serves as before
        sock.close()
    client_sockets.clear()
    eventually(lambda: served.get("/livez", timeout=2).status_code == 200, 10,
               message="the API port to serve again once slots are free")


def test_two_workers_with_every_slot_held_refuse_at_once_and_stop_cleanly(
    serve, client_sockets: list[socket.socket]
) -> None:
    """Each worker holds a connection per thread, so each steps back before taking another
    (tests/e2e/test_connection_spread.py): past the bound a new connection is still refused
    at once, the health port still answers, and SIGTERM finds every listener to close."""
    per_worker = 12
    health_port = free_port()
    served = serve(WEB_CONCURRENCY="2", GUNICORN_MAX_CONNECTIONS=str(per_worker),
                   GUNICORN_THREADS="2", GUNICORN_REQUEST_TIMEOUT="600",
                   HEALTH_PORT=str(health_port))
    hold_every_slot(served, 2 * per_worker, client_sockets)
    assert requests.get(f"http://127.0.0.1:{health_port}/livez", timeout=2).status_code == 200

    started = time.monotonic()
    with served.connect(PER_REQUEST_TIMEOUT) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_to_close(sock).partition(b"\r\n\r\n")[0]
    assert time.monotonic() - started < 3
    assert head.startswith(b"HTTP/1.1 503")

    # connections arriving as it stops: a worker may be stepping back from them
    client_sockets.extend(served.connect(PER_REQUEST_TIMEOUT) for _ in range(4))
    assert served.terminate(30) == 0
    assert "Traceback" not in served.stderr()
