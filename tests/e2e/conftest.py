"""End-to-end fixtures: a fake IAM, served flow-repository processes, a bus listener."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pika
import pytest
import requests

from flow_repository.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXECUTABLE = ROOT / ".venv" / "bin" / "flow-repository"
ALL_PERMISSIONS = ("flows.read", "flows.write", "flows.control", "flows.bulk")
SERVICE_TOKEN = "service-account-token-for-e2e"
START_DEADLINE = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, message: str,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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


class Served:
    """A ``flow-repository`` process started by a test, with its logs in files."""

    def __init__(self, arguments: list[str], env: Mapping[str, str], logs: Path,
                 port: int | None) -> None:
        self.stdout_path = logs.with_suffix(".stdout")
        self.stderr_path = logs.with_suffix(".stderr")
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}" if port else ""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([str(EXECUTABLE), *arguments], env=dict(env),
                                            stdout=out, stderr=err, cwd=logs.parent)

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url(path), timeout=kwargs.pop("timeout", 10), **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url(path), timeout=kwargs.pop("timeout", 10),
                                **kwargs)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, path: str = "/livez", timeout: float = START_DEADLINE) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"flow-repository exited with {self.process.returncode} before "
                            f"answering:\n{self.stderr()[-4000:]}")
            try:
                return self.get(path, timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answers, timeout, f"GET {path} on port {self.port}", interval=0.1)

    def terminate(self, timeout: float) -> int:
        """SIGTERM and wait; returns the exit code (fails the test if it does not exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            pytest.fail(f"flow-repository did not exit within {timeout}s of SIGTERM")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def base_env(home: Path) -> dict[str, str]:
    """The little a child process needs from outside: nothing that configures the service."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8"}


@pytest.fixture
def service_env(settings: Settings, iam: FakeIam, tmp_path: Path) -> dict[str, str]:
    """The environment of a served process wired to the fake IAM and this test's broker names."""
    return {
        **base_env(tmp_path / "home"),
        "INTROSPECT_TYPE": "basic",
        "INTROSPECT_ENDPOINT_BASIC": iam.url,
        "IAM_TOKEN": iam.service_token,
        "IAM_TOKEN_CACHE_TTL": "60",
        "QUEUE_URL": settings.queue_url,
        "EVENT_EXCHANGE": settings.event_exchange,
        "EVENT_QUEUE": settings.event_queue,
        "RELAY_POLL_SECONDS": "0.2",
        "GUNICORN_GRACEFUL_TIMEOUT": "5",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def spawn(tmp_path: Path, broker: Any) -> Iterator[Callable[..., Served]]:
    """spawn(arguments, env, port=None): start a process; stopped and its log printed afterwards.

    It depends on ``broker`` so that the processes are gone before the test's exchange and
    queues are deleted (a live consumer would declare them again).
    """
    started: list[Served] = []

    def start(arguments: list[str], env: Mapping[str, str], port: int | None = None) -> Served:
        served = Served(arguments, env, tmp_path / f"{arguments[0]}-{len(started)}", port)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.send_signal(signal.SIGTERM)
            try:
                served.process.wait(15)
            except subprocess.TimeoutExpired:
                served.kill()
        # pytest shows this only when the test failed.
        print(f"----- stderr of {served.process.args} (exit {served.process.returncode})")
        print(served.stderr()[-20000:])


@pytest.fixture
def serve(spawn: Callable[..., Served], service_env: dict[str, str],
          broker: Any) -> Callable[..., Served]:
    """serve(**env): a ready ``flow-repository serve`` on a free port (broker names cleaned up)."""

    def start(ready: str = "/livez", **overrides: str) -> Served:
        port = free_port()
        env = {**service_env, "PORT": str(port), **overrides}
        served = spawn(["serve"], env, port)
        served.wait_ready(ready)
        return served

    return start


@pytest.fixture
def api(serve: Callable[..., Served]) -> Served:
    """The common case: one served API with the fake IAM, the queue connected."""
    served = serve()
    wait_for(lambda: served.get("/healthcheck").json()["status"] == "pass", START_DEADLINE,
             "the served API to connect to RabbitMQ")
    return served


# ----------------------------------------------------------------------------- the bus


class Bus:
    """Listens to every event on the test's exchange and publishes as the orchestrator does."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.queue_url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(settings.event_exchange, "topic", durable=True)
        self.queue = self._channel.queue_declare("", exclusive=True, auto_delete=True) \
            .method.queue
        self._channel.queue_bind(self.queue, settings.event_exchange, routing_key="#")
        self.received: list[dict[str, Any]] = []

    def drain(self, seconds: float) -> None:
        """Take every message that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is not None:
                message = json.loads(body)
                message["_routingKey"] = method.routing_key
                message["_properties"] = properties
                self.received.append(message)
                continue
            if time.monotonic() >= deadline:
                return
            self._connection.sleep(0.05)

    def wait(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float,
             what: str) -> Any:
        """Drain messages until ``predicate(received)`` holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.received)
            if value:
                return value
            if time.monotonic() > deadline:
                names = [(m["headers"].get("name"), flow_id_of(m)) for m in self.received]
                pytest.fail(f"timed out after {timeout}s waiting for {what}; got {names}")
            self.drain(0.1)

    def event(self, name: str, flow_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The first ``name`` event about ``flow_id``."""
        def find(received: list[dict[str, Any]]) -> dict[str, Any] | None:
            return next((m for m in received if m["headers"].get("name") == name
                         and flow_id_of(m) == flow_id), None)

        return self.wait(find, timeout, f"{name} for flow {flow_id}")

    def publish(self, name: str, payload: Mapping[str, Any],
                service: str = "component-orchestrator") -> None:
        message = {"headers": {"name": name, "createdAt": int(time.time() * 1000),
                               "serviceName": service}, "payload": dict(payload)}
        self._channel.basic_publish(
            self._settings.event_exchange, name, json.dumps(message).encode(),
            pika.BasicProperties(content_type="application/json",
                                 delivery_mode=pika.DeliveryMode.Persistent))

    def consumers(self, queue: str) -> int:
        """How many consumers ``queue`` has (passive declare: never creates it)."""
        channel = self._connection.channel()
        try:
            return channel.queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if channel.is_open:
                channel.close()

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


def flow_id_of(message: Mapping[str, Any]) -> str | None:
    payload = message.get("payload") or {}
    return payload.get("id") or payload.get("flowId")


@pytest.fixture
def bus(settings: Settings, broker: Any) -> Iterator[Bus]:
    """A listener bound to ``#`` on this test's exchange (created before the service starts)."""
    listener = Bus(settings)
    yield listener
    listener.close()


