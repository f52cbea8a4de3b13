"""Keep-alive connections opened together are shared out over the gunicorn workers."""

from __future__ import annotations

import collections
import os
import socket
from pathlib import Path

import pytest

from support import Served, eventually

pytestmark = pytest.mark.e2e

WORKERS = 2
THREADS = 2
CONNECTIONS = 8  # two per thread of each worker


def server_side_inode(server_port: int, client_port: int) -> int | None:
    """The socket inode of the server's end of the connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            return inode
    return None


def process_holding(inode: int) -> int | None:
    """The pid of the process with a descriptor of socket ``inode``."""
    target = f"socket:[{inode}]"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(descriptor) == target:
                    return int(entry.name)
            except OSError:
                continue
    return None


def worker_of(served: Served, sock: socket.socket) -> int | None:
    inode = server_side_inode(served.port, sock.getsockname()[1])
    return None if inode is None else process_holding(inode)


def wait_for_workers(served: Served, count: int) -> None:
    """Until ``count`` workers have answered (``serve`` answers once the first is up)."""
    seen: set[int | None] = set()

    def another_answers() -> bool:
        with served.connect() as sock:
            keep_alive_get(sock)
            seen.add(worker_of(served, sock))
        return len(seen - {None}) >= count

    eventually(another_answers, 60, interval=0.05, message=f"{count} workers answering")


def keep_alive_get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, "the connection closed before its answer"
        answer += chunk
    return answer


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc")
def test_connections_opened_together_are_shared_by_the_workers(
    serve, client_sockets: list[socket.socket]
) -> None:
    # A client opening its keep-alive connections at once (a load balancer, a benchmark):
    # left to the kernel, whichever worker accepts first may take most of them (13 of 16),
    # and they then wait for its threads while the other worker idles.
    served: Served = serve(WEB_CONCURRENCY=str(WORKERS), GUNICORN_THREADS=str(THREADS))
    wait_for_workers(served, WORKERS)
    client_sockets.extend(served.connect() for _ in range(CONNECTIONS))
    for sock in client_sockets:
        assert keep_alive_get(sock).startswith(b"HTTP/1.1 200")

    holders = collections.Counter(worker_of(served, sock) for sock in client_sockets)
    assert None not in holders
    assert len(holders) == WORKERS, holders
    # Each worker holds a connection per thread before any takes more, and the rest are
    # shared out one by one (which worker takes each of those is the kernel's timing).
    assert min(holders.values()) >= THREADS, holders
    assert max(holders.values()) - min(holders.values()) <= 2, holders
