"""RabbitMQ cut mid-way under the served service: the API keeps answering and loses no event."""

from __future__ import annotations

import time
from typing import Any

import pytest

from support import Bus, Listener, Served, bearer, eventually

from .conftest import FakeIam

pytestmark = pytest.mark.e2e


def health(api: Served) -> tuple[int, dict[str, Any]]:
    response = api.get("/healthcheck")
    return response.status_code, response.json()


def unique_commands(events: Listener, flow_id: str) -> list[str]:
    """Command names about ``flow_id`` in arrival order, redeliveries (same eventId) dropped."""
    seen: set[str] = set()
    names = []
    for message in events.events(flow_id=flow_id):
        if message.name.startswith("flowrepo.") or message.event_id in seen:
            continue
        seen.add(message.event_id)
        names.append(message.name)
    return names


def test_broker_cut_and_restored(deploy, iam: FakeIam, bus: Bus, listener, broker_proxy,
                                 settings, flow_body) -> None:
    """Every process of the service (the API and its workers) reaches RabbitMQ through the
    proxy."""
    events = listener()
    deployment = deploy(QUEUE_URL=broker_proxy.url(settings.queue_url))
    api = deployment.api
    consumers = max(len(deployment.workers), 1)  # with no worker, the API consumes
    # several gunicorn workers may answer: wait until the one answering is connected too
    eventually(lambda: health(api) == (200, {"status": "pass", "details": {
        "mongoDB": {"status": "pass"}, "queue": {"status": "pass", "connected": True}}}),
        30, message="the API to connect to RabbitMQ through the proxy")
    assert bus.consumers() == consumers
    headers = bearer(iam.grant("ops", "tenant-a"))
    flows = []
    for index in range(3):
        response = api.request("POST", "/flows", headers=headers, json=flow_body(f"F{index}"))
        assert response.status_code == 201, response.text
        flows.append(response.json()["data"]["id"])
    for flow_id in flows:
        events.wait("flowrepo.flow.created", flow_id)
    assert broker_proxy.live_connections > 0, "the service must talk to RabbitMQ through the proxy"

    broker_proxy.cut()

    def degraded() -> dict[str, Any] | None:
        status, body = health(api)
        return body if status == 200 and body["status"] == "warn" else None

    body = eventually(degraded, 20, message="/healthcheck to report the queue outage")
    # Each gunicorn worker notices on its own, within its relay's poll (an idle relay's
    # connection looks open until it next looks at it). Ten answers in a row may all come
    # from one worker (the client's kept-alive connection): so let every relay poll once
    # first, then wait until ten answers in a row report it.
    time.sleep(settings.relay_poll_seconds + 0.5)
    eventually(lambda: all(degraded() for _ in range(10)), 20,
               message="every API worker to report the queue outage")
    assert body["details"]["queue"]["connected"] is False
    assert body["details"]["queue"]["status"] == "fail"
    assert body["details"]["mongoDB"]["status"] == "pass"
    eventually(lambda: bus.consumers() == 0, 20, message="every consumer cut off")

    for flow_id in flows:
        started = api.request("POST", f"/flows/{flow_id}/start", headers=headers)
        assert started.status_code == 200, started.text
        assert started.json()["data"]["status"] == "starting"
    stopped = api.request("POST", f"/flows/{flows[2]}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.text
    # The orchestrator answers for the first flow while the service cannot hear it.
    bus.publish("flow.started", flows[0])
    listed = api.get("/flows", headers=headers)
    assert listed.status_code == 200
    assert listed.json()["meta"]["total"] == 3
    assert health(api)[1]["status"] == "warn"
    # whatever reached the exchange meanwhile; nothing should have
    assert events.events("flow.starting") == events.events("flow.stopping") == []

    broker_proxy.restore()

    def all_delivered() -> bool:
        return (all("flow.starting" in unique_commands(events, flow_id) for flow_id in flows)
                and "flow.stopping" in unique_commands(events, flows[2]))

    eventually(all_delivered, 30, message="every event held during the outage")
    assert unique_commands(events, flows[0]) == ["flow.starting"]
    assert unique_commands(events, flows[1]) == ["flow.starting"]
    assert unique_commands(events, flows[2]) == ["flow.starting", "flow.stopping"]
    for message in events.events("flow.starting"):
        assert message.payload["startedBy"] == "ops"

    eventually(lambda: health(api)[1]["status"] == "pass", 30,
               message="/healthcheck to pass again")
    eventually(lambda: api.get(f"/flows/{flows[0]}", headers=headers).json()["data"]["status"]
               == "active", 30, message="the flow.started sent during the outage to be applied")
    eventually(lambda: bus.consumers() == consumers, 30, message="every consumer back")
