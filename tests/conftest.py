"""Shared fixtures: settings, a store (embedded SQLite, mongomock or a real MongoDB), the app,
tokens, the broker, the event bus, served processes (the production topology) and a TCP
proxy tests cut and restore.

The helpers behind them (polling, bus, driver, served processes) live in tests/support.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pymongo
import pytest

from flow_repository.adapters.auth import mint_token
from flow_repository.adapters.rabbitmq import close_quietly
from flow_repository.adapters.store import FlowStore, Store, open_store
from flow_repository.entrypoints.app import create_app
from flow_repository.server.logs import JsonFormatter
from flow_repository.settings import Settings
from support import (
    ALL_PERMISSIONS,
    PRODUCT_EVENTS,
    START_DEADLINE,
    Bus,
    Listener,
    Served,
    ServedDeployment,
    base_env,
    connect,
    eventually,
    free_port,
    free_ports,
    settings_env,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mongodb-url",
        default=os.environ.get("MONGODB_URL"),
        help="run against this MongoDB instead of the embedded store (default: $MONGODB_URL)",
    )
    parser.addoption(
        "--mongodb",
        choices=("embedded", "mongomock", "secantus"),
        default=os.environ.get("TEST_MONGODB", "embedded"),
        help="embedded: the SQLite store of MONGODB_URL-less mode; mongomock: the MongoDB "
             "backend on mongomock; secantus: start a SecantusDB server (MongoDB wire "
             "protocol over WiredTiger) for the session and run every test on it "
             "(default: $TEST_MONGODB or embedded)",
    )


@pytest.fixture(scope="session")
def mongodb_server(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """The URL of the real MongoDB the session runs on, or None (embedded or mongomock).

    ``--mongodb-url`` names a running server; ``--mongodb=secantus`` starts ``secantusd-py``
    on a free port with a temporary storage path and stops it when the session ends.
    """
    url = request.config.getoption("--mongodb-url")
    if url or request.config.getoption("--mongodb") != "secantus":
        yield url or None
        return
    with secantus_server(tmp_path_factory.mktemp("secantus")) as (url, _process):
        yield url


@contextlib.contextmanager
def secantus_server(directory: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``secantusd-py`` on a free port, storing under ``directory``: (its URL, its process)."""
    executable = shutil.which("secantusd-py", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.fail("--mongodb=secantus needs secantusd-py: pip install -e '.[test]'")
    port = free_port()
    log = open(directory / "secantusd.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [executable, "--host", "127.0.0.1", "--port", str(port), "--storage-path",
         str(directory / "data"), "--standalone", "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=30_000)
        client.admin.command("ping")
        client.close()
        yield url, server
    finally:
        if server.poll() is None:
            server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


@pytest.fixture
def mongodb_url(mongodb_server: str | None) -> str | None:
    return mongodb_server


@pytest.fixture
def run_id() -> str:
    """A name fragment unique to this test, for databases, exchanges and queues."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(tmp_path, run_id: str, mongodb_url: str | None) -> Settings:
    """Settings for one test: its own database (a SQLite file when embedded), exchange,
    queue and dev token secret."""
    url = None
    if mongodb_url:  # keep host, credentials and options, but use a database of our own
        url = urlunsplit(urlsplit(mongodb_url)._replace(path=f"/frtest_{run_id}"))
    return Settings.from_env(
        {},
        mongodb_url=url,
        queue_url=os.environ.get("QUEUE_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        event_exchange=f"test-event-bus-{run_id}",
        event_queue=f"test-flow-repository-{run_id}",
        dev_token_secret_file=str(tmp_path / "dev-secret"),
        dev_tokens="allow",  # in-process apps on a real MongoDB use minted tokens
        embedded_db_path=str(tmp_path / "flows.sqlite3"),
        log_level="WARNING",
    )


def open_test_store(backend: str, settings: Settings) -> Store:
    """A store of ``backend``: embedded (SQLite), mongomock, or the server in ``settings``."""
    if backend == "mongomock":
        return FlowStore.on_mongomock()
    if backend == "embedded":
        return open_store(settings.replace(mongodb_url=None))
    return open_store(settings)


@pytest.fixture
def store_of(settings: Settings) -> Iterator[Callable[[str], Store]]:
    """store_of(backend): a fresh store of "embedded", "mongomock" or "server"; emptied after."""
    opened: list[Store] = []

    def open_one(backend: str) -> Store:
        flow_store = open_test_store(backend, settings)
        flow_store.ensure_indexes()
        opened.append(flow_store)
        return flow_store

    yield open_one
    for flow_store in opened:
        flow_store.drop_all()


@pytest.fixture
def secantus(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A SecantusDB server of this test's own, which it may stop: (its URL, its process)."""
    with secantus_server(tmp_path) as started:
        yield started


@pytest.fixture
def store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Store]:
    """The session's store (--mongodb, or the server of --mongodb-url), emptied afterwards."""
    backend = "server" if settings.mongodb_url else request.config.getoption("--mongodb")
    flow_store = open_test_store(backend, settings)
    flow_store.ensure_indexes()
    yield flow_store
    flow_store.drop_all()


@pytest.fixture
def shared_store(request: pytest.FixtureRequest, settings: Settings, store: Store) -> Store:
    """The store, for tests that read what served processes wrote: those share the embedded
    file or a real MongoDB with the test, never the test's mongomock."""
    if not settings.mongodb_url and request.config.getoption("--mongodb") == "mongomock":
        pytest.skip("served processes cannot share the test's mongomock: run it embedded "
                    "(the SQLite file) or on a real MongoDB")
    return store


@pytest.fixture
def app(settings: Settings, store: FlowStore):
    """The real Flask app on the test store, without background threads."""
    return create_app(settings, store=store)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def token(settings: Settings) -> Callable[..., str]:
    """Mint a token the app accepts: token(sub, tenant=None, permissions=ALL_PERMISSIONS)."""

    def mint(sub: str = "user-1", tenant: str | None = "tenant-1",
             permissions: Sequence[str] = ALL_PERMISSIONS, ttl: int = 3600) -> str:
        return mint_token(settings, sub, tenant, list(permissions), ttl)

    return mint


@pytest.fixture
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    """Authorization headers: auth(sub, tenant, permissions)."""

    def headers(*args, **kwargs) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(*args, **kwargs)}"}

    return headers


def sample_flow(name: str = "My flow", nodes: int = 2, **extra) -> dict:
    """A valid flow body with ``nodes`` chained nodes (also the ``flow_body`` fixture)."""
    graph_nodes = [
        {"id": f"step_{i}", "componentId": f"{i + 1:024x}", "function": "process",
         "name": f"Step {i}", "fields": {"key": f"value {i}"}}
        for i in range(nodes)
    ]
    edges = [{"id": f"e{i}", "source": f"step_{i}", "target": f"step_{i + 1}",
              "config": {"mapper": {"out": "$.in"}}} for i in range(nodes - 1)]
    return {"name": name, "description": f"{name} description", "graph": {
        "nodes": graph_nodes, "edges": edges}, **extra}


@pytest.fixture
def flow_body() -> Callable[..., dict]:
    """flow_body(name="My flow", nodes=2, **extra): a valid flow body."""
    return sample_flow


@pytest.fixture
def broker(settings: Settings) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the real RabbitMQ; the test's exchange and queues are deleted afterwards."""
    connection = connect(settings)
    channel = connection.channel()
    yield channel
    cleanup = pika.BlockingConnection(pika.URLParameters(settings.queue_url)).channel()
    for queue in (settings.event_queue, f"{settings.event_queue}.dead-letter"):
        cleanup.queue_delete(queue)
    cleanup.exchange_delete(settings.event_exchange)
    cleanup.connection.close()
    # a long test may leave it idle past its heartbeats: the broker has closed it then
    close_quietly(connection)


# ----------------------------------------------------------------------------- TCP proxy


class TcpProxy:
    """A threaded TCP forwarder; ``cut()`` drops every live connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._stalled = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                self.refused += 1
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for end in (client, upstream):  # no Nagle delay on small AMQP frames (confirms)
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if not self._open.is_set():  # cut() ran while we were connecting
                    _hard_close(client)
                    _hard_close(upstream)
                    continue
                self._sockets.update((client, upstream))
                self.accepted += 1
            for source, target, outgoing in ((client, upstream, True),
                                             (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, target, outgoing),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, outgoing: bool) -> None:
        held: list[bytes] = []
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break  # what a closed client left held never arrives
                if outgoing and self._stalled.is_set():
                    held.append(data)
                    continue
                for chunk in held:
                    target.sendall(chunk)
                held.clear()
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(target)
            _hard_close(source)
            _hard_close(target)

    def cut(self) -> None:
        """Close every live connection (both sides) and refuse new ones until restore()."""
        with self._lock:
            self._open.clear()
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _hard_close(sock)

    def restore(self) -> None:
        self._open.set()

    def stall(self) -> None:
        """Hold what clients send (the broker answers nothing more) until unstall(); a
        client that closes its connection meanwhile loses what was held, as on a network
        that dropped it."""
        self._stalled.set()

    def unstall(self) -> None:
        """Forward again; held data goes out with the client's next bytes."""
        self._stalled.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._server.close()
        self._thread.join(2)

    def url(self, queue_url: str) -> str:
        """``queue_url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(queue_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


@pytest.fixture
def broker_proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test's RabbitMQ (QUEUE_URL's host and port)."""
    parts = urlsplit(settings.queue_url)
    forwarder = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    yield forwarder
    forwarder.close()


# ----------------------------------------------------------------------------- HTTP services


@dataclass
class Exchange:
    """One request a FakeService received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeService:
    """A small HTTP service. ``answer(exchange)`` gives ``(status, body)``, the body sent as
    JSON, or ``(status, content type, body bytes)`` sent as they are."""

    answer: Callable[[Exchange], tuple[Any, ...]]
    calls: list[Exchange] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    slow: bool = False  # hold every answer until ``release`` is set
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                exchange = Exchange(self.command, self.path,
                                    {k.lower(): v for k, v in self.headers.items()}, body)
                fake.calls.append(exchange)
                if fake.slow:
                    fake.release.wait(30)
                answer = fake.answer(exchange)
                if len(answer) == 2:
                    answer = (answer[0], "application/json", json.dumps(answer[1]).encode())
                status, content_type, data = answer
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def http_service() -> Iterator[Callable[[Callable[[Exchange], tuple[Any, ...]]], FakeService]]:
    """http_service(answer): start a FakeService on 127.0.0.1; every one is stopped afterwards."""
    servers: list[tuple[FakeService, ThreadingHTTPServer]] = []

    def start(answer: Callable[[Exchange], tuple[Any, ...]]) -> FakeService:
        fake = FakeService(answer)
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
        server.daemon_threads = True
        fake.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append((fake, server))
        return fake

    yield start
    for fake, server in servers:
        fake.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (a service that is down)."""
    return free_port()
# ----------------------------------------------------------------------------- the event bus


@pytest.fixture
def bus(settings: Settings, broker) -> Iterator[Bus]:
    """Publish as the orchestrator or IAM, and inspect the service's queues."""
    connection = connect(settings)
    yield Bus(settings, connection)
    close_quietly(connection)


@pytest.fixture
def listener(settings: Settings, broker) -> Iterator[Callable[..., Listener]]:
    """listener(*routing_keys, declare=True): collects what the service publishes."""
    opened: list[Listener] = []

    def make(*keys: str, declare: bool = True) -> Listener:
        created = Listener(settings, keys or PRODUCT_EVENTS, declare)
        opened.append(created)
        return created

    yield make
    for item in opened:
        item.close()


# ----------------------------------------------------------------------------- served processes


@pytest.fixture
def spawn(tmp_path: Path, broker, store: FlowStore) -> Iterator[Callable[..., Served]]:
    """spawn(arguments, env, port=None): start a process; stopped and its log printed afterwards.

    It depends on ``broker`` and ``store`` so that the processes are gone before the test's
    exchange, queues and database are deleted (a live consumer would declare them again).
    """
    started: list[Served] = []

    def start(arguments: list[str], env: dict[str, str], port: int | None = None) -> Served:
        served = Served(arguments, env, tmp_path / f"{arguments[0]}-{len(started)}", port)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.send_signal(signal.SIGTERM)
    for served in started:
        try:
            served.process.wait(15)
        except subprocess.TimeoutExpired:
            served.kill()
        # pytest shows this only when the test failed.
        print(f"----- stderr of {served.process.args} (exit {served.process.returncode})")
        print(served.stderr()[-20000:])


@pytest.fixture
def process_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The environment of a served process on this test's database, broker names and secret."""
    return {
        **base_env(tmp_path / "home"),
        **settings_env(settings, "mongodb_url", "embedded_db_path", "queue_url",
                       "event_exchange", "event_queue", "dev_token_secret_file", "dev_tokens",
                       "relay_poll_seconds"),
        "GUNICORN_GRACEFUL_TIMEOUT": "5",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def launch(spawn: Callable[..., Served], bus: Bus) -> Callable[..., ServedDeployment]:
    """launch(env, workers=None): ``serve`` plus ``workers`` ``worker`` processes, all ready.

    The production topology, on a real MongoDB as on the embedded SQLite file (the test's
    EMBEDDED_DB_PATH): ``serve`` runs two gunicorn workers (each with its outbox relay) and
    the status consumer and reconciler run in separate ``worker`` processes (default one)
    on the same database. With ``workers=0``, ``serve`` alone (embedded, one of its workers
    then consumes). An embedded ``:memory:`` store cannot be shared with worker processes.
    """

    def start(env: dict[str, str], workers: int | None = None,
              apis: int = 1) -> ServedDeployment:
        alone = not env.get("MONGODB_URL") and env.get("EMBEDDED_DB_PATH") == ":memory:"
        workers = (0 if alone else 1) if workers is None else workers
        if alone and (workers or apis > 1):
            pytest.fail("more processes need a database file or a MongoDB to share")
        ports = free_ports(apis + workers)
        api_ports, health_ports = ports[:apis], ports[apis:]
        # The workers first: embedded, ``serve`` then finds them there and never consumes.
        crew = [spawn(["worker"], {**env, "WORKER_HEALTH_PORT": str(health_port)}, health_port)
                for health_port in health_ports]
        servers = [spawn(["serve"], {**env, "PORT": str(port), "WEB_CONCURRENCY": "2"}, port)
                   for port in api_ports]
        for served in servers + crew:
            served.wait_ready("/healthcheck")
        bus.wait_consumers(workers or 1, timeout=START_DEADLINE)
        for served in servers:
            eventually(lambda api=served: api.get("/healthcheck").json()["status"] == "pass",
                       START_DEADLINE, message="the served API to connect to RabbitMQ")
        return ServedDeployment(servers, crew)

    return start


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict]]]:
    """Every log line of the process (INFO and up) as parsed JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(previous)
