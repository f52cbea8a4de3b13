"""Integration fixtures: the running service (in-process or the production topology), the
in-process app for fault injection, lifecycle drivers and the OIH envelope check."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flow_repository.adapters.store import FlowStore
from flow_repository.adapters.tracing import Tracing
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings
from support import (
    Bus,
    Driver,
    InProcessDeployment,
    Received,
    ServedDeployment,
    eventually,
    settings_env,
)

HEX_EVENT_ID = re.compile(r"^[0-9a-f]{16,64}$")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, with a relay that polls often enough for quick tests."""
    return settings.replace(relay_poll_seconds=0.2)


def in_process(custom: Settings, store: FlowStore, bus: Bus,
               background: bool, tracing: Tracing | None = None) -> InProcessDeployment:
    """An app in this process on ``store``; with ``background`` it consumes, relays and
    reconciles itself, and is returned once it consumes and its relay is connected.
    ``tracing``: the app's (default: as the settings say, off in tests)."""
    # mongodb_url=None: every loop runs here, whichever backend ``store`` is; the embedded
    # database :memory: (never opened: ``store`` is given) says this process is alone, so it
    # consumes at once instead of taking turns with other processes on a file.
    alone = custom.replace(mongodb_url=None, embedded_db_path=":memory:")
    deployment = InProcessDeployment(create_app(alone, store=store, background=background,
                                                tracing=tracing))
    if background:
        bus.wait_consumers(1)
        eventually(lambda: deployment.runtime.relay.connected, timeout=15,
                   message="relay connected")
    return deployment


@pytest.fixture
def deploy(settings: Settings, store: FlowStore, bus: Bus, launch,
           process_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    """deploy(**setting_changes): the running service, whatever the topology.

    Embedded: the app in this process, with its consumer, relay and reconciler threads.
    On a real MongoDB: the production topology, ``serve`` with two gunicorn workers and one
    ``worker`` process on the test's database (see ``launch``).
    """
    started: list[InProcessDeployment | ServedDeployment] = []

    def make(**changes: Any) -> InProcessDeployment | ServedDeployment:
        custom = settings.replace(**changes)
        if custom.embedded:
            deployment = in_process(custom, store, bus, background=True)
        else:
            deployment = launch({**process_env, **settings_env(custom, *changes)})
        started.append(deployment)
        return deployment

    yield make
    for deployment in reversed(started):
        deployment.stop()


@pytest.fixture
def deployment(deploy) -> InProcessDeployment | ServedDeployment:
    return deploy()


@pytest.fixture
def make_app(settings: Settings, store: FlowStore, bus: Bus) -> Iterator[Callable[..., Any]]:
    """make_app(settings=None, background=True, tracing=None): the app in this process, on
    any backend.

    For tests that inject faults into the consumer, relay or reconciler: those must run in
    the test's own process, so here they do even on a real MongoDB (on the test's database).
    """
    started: list[InProcessDeployment] = []

    def make(custom: Settings | None = None, *, background: bool = True,
             tracing: Tracing | None = None) -> InProcessDeployment:
        deployment = in_process(custom or settings, store, bus, background, tracing)
        started.append(deployment)
        return deployment

    yield make
    for deployment in reversed(started):
        deployment.stop()


@pytest.fixture
def drive(bus: Bus, auth, store: FlowStore, flow_body) -> Callable[..., Driver]:
    """drive(deployment, headers=None): a Driver for it (default caller user-1 / tenant-1)."""

    def make(deployment, headers: dict[str, str] | None = None) -> Driver:
        return Driver(deployment, bus, headers or auth(), store, flow_body)

    return make


@pytest.fixture
def driver(deployment, drive) -> Driver:
    return drive(deployment)


def assert_envelope(message: Received, *, now_ms: int | None = None) -> dict:
    """Check the OIH wire format and AMQP properties of one message the service published."""
    body = message.body
    headers = body["headers"]
    assert set(body) == {"headers", "payload"}
    assert headers["name"] == message.routing_key
    assert headers["serviceName"] == "flow-repository"
    assert isinstance(headers["createdAt"], int) and not isinstance(headers["createdAt"], bool)
    now_ms = now_ms or int(time.time() * 1000)
    assert abs(now_ms - headers["createdAt"]) < 120_000, headers["createdAt"]
    assert HEX_EVENT_ID.match(headers["eventId"]), headers["eventId"]
    assert message.properties.delivery_mode == 2
    assert message.properties.content_type == "application/json"
    assert message.properties.message_id == headers["eventId"]
    assert isinstance(body["payload"], dict)
    return body
