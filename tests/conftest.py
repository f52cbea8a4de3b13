"""Shared fixtures: settings, a store (mongomock or MONGODB_URL), the app, tokens, broker names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from flow_repository.app import create_app
from flow_repository.auth import mint_token
from flow_repository.settings import Settings
from flow_repository.store import FlowStore

ALL_PERMISSIONS = ("flows.read", "flows.write", "flows.control", "flows.bulk")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mongodb-url",
        default=os.environ.get("MONGODB_URL"),
        help="run against this MongoDB instead of mongomock (default: $MONGODB_URL)",
    )


@pytest.fixture
def mongodb_url(request: pytest.FixtureRequest) -> str | None:
    return request.config.getoption("--mongodb-url") or None


@pytest.fixture
def run_id() -> str:
    """A name fragment unique to this test, for databases, exchanges and queues."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(tmp_path, run_id: str, mongodb_url: str | None) -> Settings:
    """Settings for one test: its own database, exchange, queue and dev token secret."""
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
        log_level="WARNING",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[FlowStore]:
    """The store the settings name (mongomock unless MONGODB_URL), emptied afterwards."""
    flow_store = FlowStore.from_settings(settings)
    flow_store.ensure_indexes()
    yield flow_store
    flow_store.drop_all()


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
    try:
        connection = pika.BlockingConnection(pika.URLParameters(settings.queue_url))
    except pika.exceptions.AMQPError as error:
        pytest.fail(f"RabbitMQ is not reachable at {settings.queue_url}: {error!r}")
    channel = connection.channel()
    yield channel
    cleanup = pika.BlockingConnection(pika.URLParameters(settings.queue_url)).channel()
    for queue in (settings.event_queue, f"{settings.event_queue}.dead-letter"):
        cleanup.queue_delete(queue)
    cleanup.exchange_delete(settings.event_exchange)
    cleanup.connection.close()
    if connection.is_open:
        connection.close()
