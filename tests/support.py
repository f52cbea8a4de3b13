"""Test helpers shared by every test layer: polling, the broker, served processes, the
running service (in-process or the production topology) and the lifecycle driver."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import requests
from bson import ObjectId

from flow_repository.entrypoints.consumer import dead_letter_queue
from flow_repository.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLE = ROOT / ".venv" / "bin" / "flow-repository"
START_DEADLINE = 30.0
ALL_PERMISSIONS = ("flows.read", "flows.write", "flows.control", "flows.bulk")
PRODUCT_EVENTS = (
    "flow.starting",
    "flow.stopping",
    "flowrepo.flow.created",
    "flowrepo.flow.modified",
    "flowrepo.flow.deleted",
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nobody uses right now, below the system's range of
    ephemeral ports: a port the system handed out for probing could meanwhile become the
    local port of an outgoing connection (a relay's to RabbitMQ), and the server started
    on it then failed with "Address already in use". All are held at once while probed."""
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
                               .split()[0])
    except OSError:  # not Linux
        lowest_ephemeral = 32768
    candidates = random.sample(range(10_000, lowest_ephemeral), k=min(count * 20,
                                                                      lowest_ephemeral - 10_000))
    probes: list[socket.socket] = []
    try:
        for port in candidates:
            probe = socket.socket()
            try:
                probe.bind(("0.0.0.0", port))  # as the servers bind
            except OSError:
                probe.close()
                continue
            probes.append(probe)
            if len(probes) == count:
                return [probe.getsockname()[1] for probe in probes]
        raise RuntimeError(f"no {count} free ports below {lowest_ephemeral}")
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    return free_ports(1)[0]


def child_pids(parent: int) -> list[int]:
    """The processes ``parent`` started (a gunicorn master's workers), oldest first."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(child) for child in children)


def eventually(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    An AssertionError raised by the condition counts as "not yet" and is re-raised as the
    cause when the deadline passes, so conditions may be written with plain asserts.
    """
    deadline = time.monotonic() + timeout
    last_error: AssertionError | None = None
    while True:
        try:
            result = condition()
        except AssertionError as error:
            last_error, result = error, None
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(condition, "__name__", repr(condition))
            raise AssertionError(f"not true within {timeout}s: {what}") from last_error
        time.sleep(interval)


def statuses(store, flows: list[str]) -> dict[str, int]:
    """How many of ``flows`` are in each status, as stored."""
    counts: dict[str, int] = {}
    for flow_id in flows:
        status = store.raw(ObjectId(flow_id))["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------------------------- the broker


@dataclass
class Received:
    """One message taken from a queue: routing key, AMQP properties and decoded body."""

    routing_key: str
    exchange: str
    properties: pika.BasicProperties
    raw: bytes
    redelivered: bool

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def name(self) -> str:
        return self.body["headers"]["name"]

    @property
    def payload(self) -> dict:
        return self.body["payload"]

    @property
    def flow_id(self) -> str | None:
        payload = self.body.get("payload") or {}
        return payload.get("id") or payload.get("flowId")

    @property
    def event_id(self) -> str:
        return self.body["headers"]["eventId"]


def connect(settings: Settings) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    except pika.exceptions.AMQPError as error:
        pytest.fail(f"RabbitMQ is not reachable at {settings.queue_url}: {error!r}")


def exchange_exists(connection: pika.BlockingConnection, exchange: str) -> bool:
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    channel.close()
    return True


class Listener:
    """A private queue bound to the test's exchange; collects what the service publishes."""

    def __init__(self, settings: Settings, keys: tuple[str, ...], declare: bool = True) -> None:
        self._connection = connect(settings)
        self._channel = self._connection.channel()
        exchange = settings.event_exchange
        if declare:
            self._channel.exchange_declare(exchange, "topic", durable=True)
        else:  # wait for the service to declare it, so its declaration is the one observed
            eventually(lambda: exchange_exists(self._connection, exchange), timeout=10,
                       message=f"exchange {exchange} declared by the service")
        self.queue = self._channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in keys:
            self._channel.queue_bind(self.queue, exchange, routing_key=key)
        self.messages: list[Received] = []

    def drain(self) -> list[Received]:
        """Fetch everything waiting; returns every message collected so far."""
        while True:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.messages
            self.messages.append(Received(method.routing_key, method.exchange, properties,
                                          body, method.redelivered))

    def events(self, name: str | None = None, flow_id: Any = None) -> list[Received]:
        """Collected messages, optionally of one event name and/or about one flow."""
        self.drain()
        wanted = None if flow_id is None else str(flow_id)
        return [m for m in self.messages
                if (name is None or m.routing_key == name)
                and (wanted is None or m.flow_id == wanted)]

    def wait(self, name: str, flow_id: Any = None, count: int = 1,
             timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``count`` messages of ``name`` (about ``flow_id``) arrived."""
        return eventually(
            lambda: (found := self.events(name, flow_id)) and len(found) >= count and found,
            timeout=timeout, message=f"{count} x {name} for flow {flow_id}",
        )

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


class Bus:
    """Publishes as the orchestrator or IAM on the test's exchange; inspects its queues."""

    def __init__(self, settings: Settings, connection: pika.BlockingConnection) -> None:
        self.settings = settings
        self._connection = connection
        self._channel = connection.channel()
        self._channel.confirm_delivery()
        self._declared = False

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue(self.settings.event_queue)

    def envelope(self, name: str, flow_id: Any) -> dict:
        return {
            "headers": {"name": name, "createdAt": int(time.time() * 1000),
                        "serviceName": "component-orchestrator"},
            "payload": {"id": str(flow_id)},
        }

    def publish(self, name: str, flow_id: Any = None, *, body: Any = None,
                raw: bytes | None = None, headers: Mapping[str, Any] | None = None) -> bytes:
        """Publish an OIH envelope (or ``body``/``raw`` as given) to the exchange as ``name``."""
        if not self._declared:
            self._channel.exchange_declare(self.settings.event_exchange, "topic", durable=True)
            self._declared = True
        if raw is None:
            raw = json.dumps(self.envelope(name, flow_id) if body is None else body).encode()
        self._channel.basic_publish(
            self.settings.event_exchange, name, raw,
            pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 message_id=uuid.uuid4().hex, headers=dict(headers or {})),
            mandatory=True,
        )
        return raw

    def replay(self, raw: bytes, headers: Mapping[str, Any]) -> None:
        """Publish straight into the service's queue, as an operator replays a dead letter."""
        self._channel.basic_publish(
            "", self.settings.event_queue, raw,
            pika.BasicProperties(delivery_mode=2, headers=dict(headers)),
        )

    def bind(self, routing_key: str) -> None:
        self._channel.queue_bind(self.settings.event_queue, self.settings.event_exchange,
                                 routing_key=routing_key)

    def queue_state(self, queue: str | None = None) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None when it does not exist."""
        channel = self._connection.channel()
        try:
            frame = channel.queue_declare(queue or self.settings.event_queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        channel.close()
        return frame.method.message_count, frame.method.consumer_count

    def consumers(self, queue: str | None = None) -> int:
        """How many consumers the service's queue (or ``queue``) has; 0 when it does not exist."""
        state = self.queue_state(queue)
        return state[1] if state else 0

    def wait_consumers(self, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until the service's queue exists, is bound and has ``count`` consumers."""
        eventually(lambda: self.consumers() == count, timeout=timeout,
                   message=f"{count} consumer(s) on {self.settings.event_queue}")

    def take(self, queue: str) -> list[Received]:
        """Remove and return every message waiting in ``queue``."""
        taken = []
        while True:
            method, properties, body = self._channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append(Received(method.routing_key, method.exchange, properties, body,
                                  method.redelivered))

    def dead_letters(self) -> list[Received]:
        return self.take(self.dead_letter_queue)


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

    def connect(self, timeout: float = 10) -> socket.socket:
        """A raw TCP connection to the served port."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url(path), timeout=kwargs.pop("timeout", 10), **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url(path), timeout=kwargs.pop("timeout", 10),
                                **kwargs)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def answers(self, path: str) -> bool:
        """True once ``path`` answers 200; fails the test if the process exited."""
        if self.process.poll() is not None:
            pytest.fail(f"flow-repository exited with {self.process.returncode}:\n"
                        f"{self.stderr()[-4000:]}")
        try:
            return self.get(path, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, path: str = "/livez", timeout: float = START_DEADLINE) -> None:
        eventually(lambda: self.answers(path), timeout, interval=0.1,
                   message=f"GET {path} on port {self.port}")

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


def settings_env(settings: Settings, *names: str) -> dict[str, str]:
    """The environment variables that reproduce these fields of ``settings`` (set ones only)."""
    env = {}
    for item in dataclasses.fields(Settings):
        value = getattr(settings, item.name)
        if item.name not in names or value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[item.metadata["env"]] = str(value)
    return env


class HttpAnswer:
    """A requests answer with the Flask test-client methods the tests read."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.headers = response.headers

    def get_json(self) -> Any:
        return self.response.json()

    def get_data(self, as_text: bool = False) -> str | bytes:
        return self.response.text if as_text else self.response.content


class HttpClient:
    """Speaks to a served API with the Flask test client's calls (get/post/patch/delete)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session = requests.Session()

    def open(self, method: str, path: str, **kwargs: Any) -> HttpAnswer:
        return HttpAnswer(self._session.request(method, self.base_url + path,
                                                timeout=kwargs.pop("timeout", 30), **kwargs))

    def get(self, path: str, **kwargs: Any) -> HttpAnswer:
        return self.open("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> HttpAnswer:
        return self.open("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> HttpAnswer:
        return self.open("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> HttpAnswer:
        return self.open("DELETE", path, **kwargs)

    def close(self) -> None:
        self._session.close()


# ----------------------------------------------------------------------------- the running service


class InProcessDeployment:
    """Embedded mode: one Flask app whose process also runs consumer, relay and reconciler."""

    def __init__(self, application) -> None:
        self.app = application
        self.client = application.test_client()

    @property
    def runtime(self):
        return self.app.extensions["flow_repository"]

    def consumer_metrics(self) -> str:
        """Prometheus text of the process that consumes (here the API itself)."""
        return self.client.get("/metrics").get_data(as_text=True)

    def consumers_alive(self) -> bool:
        return self.runtime.consumer.alive

    def stop(self) -> None:
        self.runtime.stop()


class ServedDeployment:
    """The production topology: ``serve`` (its gunicorn workers) plus ``worker`` processes."""

    def __init__(self, apis: list[Served], workers: list[Served]) -> None:
        self.apis = apis
        self.api = apis[0]
        self.workers = workers
        self.clients = [HttpClient(api.base_url) for api in apis]
        self.client = self.clients[0]

    def consumer_metrics(self) -> str:
        """The Prometheus text of every worker process, one after the other."""
        return "\n".join(worker.get("/metrics").text for worker in self.workers)

    def consumers_alive(self) -> bool:
        return all(worker.get("/livez").status_code == 200 for worker in self.workers)

    def stop(self) -> None:
        for client in self.clients:
            client.close()


class Driver:
    """Drives flows through the API and orchestrator reports, checking each answer."""

    def __init__(self, deployment: InProcessDeployment | ServedDeployment, bus: Bus,
                 headers: dict[str, str], store, flow_body: Callable[..., dict]) -> None:
        self.deployment = deployment
        self.client = deployment.client
        self.bus = bus
        self.headers = headers
        self.store = store
        self.flow_body = flow_body

    def create(self, body: Mapping[str, Any] | None = None, headers=None) -> str:
        response = self.client.post("/flows", json=dict(body or self.flow_body()),
                                    headers=headers or self.headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()["data"]["id"]

    def get(self, flow_id: str) -> dict:
        response = self.client.get(f"/flows/{flow_id}", headers=self.headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["data"]

    def command(self, flow_id: str, action: str, expect: int = 200) -> dict:
        response = self.client.post(f"/flows/{flow_id}/{action}", headers=self.headers)
        assert response.status_code == expect, response.get_json()
        return response.get_json()

    def state(self, flow_id: str) -> dict | None:
        """The stored document, or the API's view when the store is inside a served process."""
        if self.store is None:
            return self.get(flow_id)
        return self.store.raw(ObjectId(flow_id))

    def wait_status(self, flow_id: str, status: str, timeout: float = 15.0) -> dict:
        """The flow's state (see ``state``) once it is in ``status``."""
        return eventually(lambda: (doc := self.state(flow_id)) and doc["status"] == status
                          and doc, timeout=timeout, message=f"flow {flow_id} {status}")

    def report(self, name: str, flow_id: Any) -> None:
        self.bus.publish(name, flow_id)

    def bring_to(self, status: str, body: Mapping[str, Any] | None = None) -> str:
        """A new flow in ``status``, reached through the real API and orchestrator reports."""
        flow_id = self.create(body)
        if status == "inactive":
            return flow_id
        assert self.command(flow_id, "start")["data"]["status"] == "starting"
        if status == "starting":
            return flow_id
        self.report("flow.started", flow_id)
        self.wait_status(flow_id, "active")
        if status == "active":
            return flow_id
        assert self.command(flow_id, "stop")["data"]["status"] == "stopping"
        assert status == "stopping", status
        return flow_id

    def barrier(self) -> None:
        """Return once every message published before it has been handled by the consumer.

        The service's queue has one consumer, which handles its messages strictly in
        delivery order: when a flow.started published now has been applied, so has all before it.
        """
        flow_id = self.bring_to("starting")
        self.report("flow.started", flow_id)
        self.wait_status(flow_id, "active")


def open_event_stream(port: int, token: str, timeout: float = 10.0) -> socket.socket:
    """GET /flows/events on a raw socket; returned once the answer's head has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"GET /flows/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                 f"\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def every_backend(metafunc: pytest.Metafunc) -> None:
    """A module's ``pytest_generate_tests``: its tests taking ``backend`` run on every store
    backend (embedded SQLite, mongomock, and the real server with --mongodb=secantus or
    --mongodb-url)."""
    if "backend" in metafunc.fixturenames:
        backends = ["embedded", "mongomock"]
        config = metafunc.config
        if config.getoption("--mongodb-url") or config.getoption("--mongodb") == "secantus":
            backends.append("server")
        metafunc.parametrize("backend", backends)
