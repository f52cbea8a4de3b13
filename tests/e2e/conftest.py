"""End-to-end fixtures: a fake IAM and served flow-repository processes wired to it."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from support import ALL_PERMISSIONS, Served, ServedDeployment, free_port

SERVICE_TOKEN = "service-account-token-for-e2e"


# ----------------------------------------------------------------------------- fake IAM


@dataclass
class IamCall:
    """One introspection request the fake IAM received."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeIam:
    """OIH basic introspection: POST {"token"} with the service token as Bearer."""

    service_token: str = SERVICE_TOKEN
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[IamCall] = field(default_factory=list)
    mode: str = "up"  # up | down (HTTP 500) | closed (drops the connection unanswered)
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def __post_init__(self) -> None:
        self.gate.set()

    def grant(self, sub: str = "user-1", tenant: str | None = "tenant-1",
              permissions: tuple[str, ...] | list[str] = ALL_PERMISSIONS, **claims: Any) -> str:
        """Register a new user token and return it.

        IAM answers with the account document itself (services/iam/src/routes/tokens.js
        `res.send(accountData)`): the account id is ``_id`` and there is no ``sub``.
        """
        token = f"user-token-{uuid.uuid4().hex}"
        self.tokens[token] = {"_id": sub, "username": f"{sub}@example.com", "tenant": tenant,
                              "roles": [], "permissions": list(permissions),
                              "isAdmin": "all" in permissions, **claims}
        return token

    def calls_for(self, token: str) -> list[IamCall]:
        with self.lock:
            return [call for call in self.calls
                    if isinstance(call.body, dict) and call.body.get("token") == token]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        iam = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                headers = {name.lower(): value for name, value in self.headers.items()}
                with iam.lock:
                    iam.calls.append(IamCall(self.path, headers, body))
                iam.gate.wait(30)
                if iam.mode == "closed":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if iam.mode == "down":
                    self._send(500, {"message": "IAM exploded"})
                    return
                authorized = (headers.get("authorization") == f"Bearer {iam.service_token}"
                              and headers.get("x-auth-type") == "basic")
                claims = iam.tokens.get(body.get("token")) if isinstance(body, dict) else None
                if not authorized or claims is None:
                    self._send(401, {"message": "Unauthorized"})
                    return
                self._send(200, claims)

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


@pytest.fixture
def client_sockets() -> Iterator[list[socket.socket]]:
    """Raw client sockets a test opens (``served.connect()``), closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
def iam() -> Iterator[FakeIam]:
    """A fake OIH IAM introspection endpoint on 127.0.0.1, recording every call."""
    fake = FakeIam()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/tokens/introspect"
    thread = threading.Thread(target=server.serve_forever, name="fake-iam", daemon=True)
    thread.start()
    yield fake
    fake.gate.set()
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- served processes


@pytest.fixture
def service_env(process_env: dict[str, str], iam: FakeIam) -> dict[str, str]:
    """The environment of a served process: this test's database and broker, the fake IAM."""
    return {
        **process_env,
        "INTROSPECT_TYPE": "basic",
        "INTROSPECT_ENDPOINT_BASIC": iam.url,
        "IAM_TOKEN": iam.service_token,
        "IAM_TOKEN_CACHE_TTL": "60",
    }


@pytest.fixture
def serve(spawn: Callable[..., Served], service_env: dict[str, str]) -> Callable[..., Served]:
    """serve(ready="/livez", **env): one ready ``flow-repository serve`` on a free port."""

    def start(ready: str = "/livez", **overrides: str) -> Served:
        port = free_port()
        served = spawn(["serve"], {**service_env, "PORT": str(port), **overrides}, port)
        served.wait_ready(ready)
        return served

    return start


@pytest.fixture
def deploy(launch, service_env: dict[str, str]) -> Callable[..., ServedDeployment]:
    """deploy(workers=None, apis=1, **env): the whole service as processes, connected and
    consuming (``apis`` ``serve`` processes, each with two gunicorn workers).

    The production topology (``serve`` with two gunicorn workers plus ``worker``
    processes), on a real MongoDB or on the embedded SQLite file; ``workers=0``: ``serve``
    alone, which then consumes itself (embedded only).
    """

    def start(workers: int | None = None, apis: int = 1, **overrides: str) -> ServedDeployment:
        return launch({**service_env, **overrides}, workers, apis)

    return start


@pytest.fixture
def api(deploy) -> Served:
    """The common case: the service deployed with the fake IAM; its API process."""
    return deploy().api
