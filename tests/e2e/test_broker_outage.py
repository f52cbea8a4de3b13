"""RabbitMQ cut mid-way under a served process: the API keeps answering and loses no event."""

from __future__ import annotations

from typing import Any

from .conftest import START_DEADLINE, Bus, FakeIam, Served, bearer, wait_for


def health(api: Served) -> tuple[int, dict[str, Any]]:
    response = api.get("/healthcheck")
    return response.status_code, response.json()


def unique_names(bus: Bus, flow_id: str) -> list[str]:
    """Event names about ``flow_id`` in arrival order, redeliveries (same eventId) dropped."""
    seen: set[str] = set()
    names = []
    for message in bus.received:
        headers = message["headers"]
        if (message["payload"].get("id") != flow_id or headers["name"].startswith("flowrepo.")
                or headers["serviceName"] != "flow-repository"):
            continue
        if headers["eventId"] not in seen:
            seen.add(headers["eventId"])
            names.append(headers["name"])
    return names


def test_broker_cut_and_restored(serve, iam: FakeIam, bus: Bus, broker_proxy,
                                 settings, flow_body) -> None:
    api = serve(QUEUE_URL=f"amqp://guest:guest@127.0.0.1:{broker_proxy.port}/%2F")
    wait_for(lambda: health(api) == (200, {"status": "pass", "details": {
        "mongoDB": {"status": "pass"}, "queue": {"status": "pass", "connected": True}}}),
        START_DEADLINE, "the API to connect to RabbitMQ through the proxy")
    wait_for(lambda: bus.consumers(settings.event_queue) == 1, START_DEADLINE,
             "the embedded consumer to attach")
    headers = bearer(iam.grant("ops", "tenant-a"))
    flows = []
    for index in range(3):
        response = api.request("POST", "/flows", headers=headers, json=flow_body(f"F{index}"))
        assert response.status_code == 201, response.text
        flows.append(response.json()["data"]["id"])
    for flow_id in flows:
        bus.event("flowrepo.flow.created", flow_id)
    assert broker_proxy.live_connections > 0, "the service must talk to RabbitMQ through the proxy"

    broker_proxy.cut()

    def degraded() -> bool:
        status, body = health(api)
        return status == 200 and body["status"] == "warn"

    wait_for(degraded, 20, "/healthcheck to report the queue outage")
    _, body = health(api)
    assert body["details"]["queue"]["connected"] is False
    assert body["details"]["queue"]["status"] == "fail"
    assert body["details"]["mongoDB"]["status"] == "pass"
    assert bus.consumers(settings.event_queue) == 0

    for flow_id in flows:
        started = api.request("POST", f"/flows/{flow_id}/start", headers=headers)
        assert started.status_code == 200, started.text
        assert started.json()["data"]["status"] == "starting"
    stopped = api.request("POST", f"/flows/{flows[2]}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.text
    # The orchestrator answers for the first flow while the service cannot hear it.
    bus.publish("flow.started", {"id": flows[0]})
    listed = api.get("/flows", headers=headers)
    assert listed.status_code == 200
    assert listed.json()["meta"]["total"] == 3
    assert health(api)[1]["status"] == "warn"
    bus.drain(0.3)  # whatever reached the exchange meanwhile; nothing should have
    assert not [m for m in bus.received if m["headers"]["name"] in ("flow.starting",
                                                                     "flow.stopping")]

    broker_proxy.restore()

    def all_delivered(received: list[dict]) -> bool:
        return (all("flow.starting" in unique_names(bus, flow_id) for flow_id in flows)
                and "flow.stopping" in unique_names(bus, flows[2]))

    bus.wait(all_delivered, 30, "every event held during the outage")
    assert unique_names(bus, flows[0]) == ["flow.starting"]
    assert unique_names(bus, flows[1]) == ["flow.starting"]
    assert unique_names(bus, flows[2]) == ["flow.starting", "flow.stopping"]
    for message in bus.received:
        if message["headers"]["name"] == "flow.starting":
            assert message["payload"]["startedBy"] == "ops"

    wait_for(lambda: health(api)[1]["status"] == "pass", 30, "/healthcheck to pass again")
    wait_for(lambda: api.get(f"/flows/{flows[0]}", headers=headers).json()["data"]["status"]
             == "active", 30, "the flow.started sent during the outage to be applied")
    assert bus.consumers(settings.event_queue) == 1
