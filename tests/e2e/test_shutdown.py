"""Graceful shutdown on SIGTERM of the real API and worker processes, within a pod's grace period."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from support import START_DEADLINE, Bus, bearer, eventually, free_port

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

GRACE = 5  # GUNICORN_GRACEFUL_TIMEOUT of the served process
MARGIN = 4  # start-up of the interpreter aside, stopping the relay and consumer is quick


def test_api_finishes_in_flight_requests_on_sigterm(serve, iam: FakeIam, flow_body) -> None:
    api = serve(GUNICORN_THREADS="8", GUNICORN_GRACEFUL_TIMEOUT=str(GRACE))
    tokens = [iam.grant(f"user-{index}", "tenant-a") for index in range(6)]
    results: dict[int, requests.Response | Exception] = {}

    def create(index: int) -> None:
        try:
            results[index] = api.request("POST", "/flows", headers=bearer(tokens[index]),
                                         json=flow_body(f"In flight {index}"), timeout=30)
        except requests.RequestException as error:
            results[index] = error

    iam.gate.clear()  # every request now waits inside the API for IAM's answer
    threads = [threading.Thread(target=create, args=(index,)) for index in range(len(tokens))]
    for thread in threads:
        thread.start()
    eventually(lambda: len(iam.calls) == len(tokens), 10, message="every request to reach IAM")

    signalled = time.monotonic()
    api.process.send_signal(signal.SIGTERM)
    eventually(lambda: "Handling signal: term" in api.stderr(), 10, message="gunicorn to take SIGTERM")
    assert api.process.poll() is None, "the API must wait for its in-flight requests"
    iam.gate.set()
    for thread in threads:
        thread.join(30)

    for index, outcome in sorted(results.items()):
        assert isinstance(outcome, requests.Response), f"request {index} failed: {outcome!r}"
        assert outcome.status_code == 201, outcome.text
        assert outcome.json()["data"]["name"] == f"In flight {index}"
    assert len(results) == len(tokens)
    assert api.terminate(GRACE + MARGIN) == 0
    assert time.monotonic() - signalled < GRACE + MARGIN
    stderr = api.stderr()
    assert "Shutting down: Master" in stderr
    assert "Traceback" not in stderr


def test_idle_api_exits_promptly_on_sigterm(serve) -> None:
    api = serve(GUNICORN_GRACEFUL_TIMEOUT="30")
    signalled = time.monotonic()
    assert api.terminate(30) == 0
    assert time.monotonic() - signalled < MARGIN, "an idle API must not sit out the grace time"


def test_api_exits_promptly_on_sigterm_while_rabbitmq_is_away(serve, broker_proxy,
                                                              settings) -> None:
    api = serve(QUEUE_URL=broker_proxy.url(settings.queue_url))
    eventually(lambda: api.get("/healthcheck").json()["status"] == "pass", START_DEADLINE,
             message="the API to connect through the proxy")
    broker_proxy.cut()
    eventually(lambda: api.get("/healthcheck").json()["status"] == "warn", 20,
             message="the API to notice the outage")
    signalled = time.monotonic()
    assert api.terminate(GRACE + MARGIN) == 0
    assert time.monotonic() - signalled < GRACE + MARGIN


def test_worker_serves_health_and_stops_on_sigterm(spawn, process_env, bus: Bus) -> None:
    port = free_port()
    worker = spawn(["worker"], {**process_env, "WORKER_HEALTH_PORT": str(port)}, port)
    worker.wait_ready("/livez")
    assert worker.get("/livez").json() == {"status": "pass"}
    eventually(lambda: worker.get("/healthcheck").status_code == 200, START_DEADLINE,
             message="the worker's /healthcheck to pass")
    health = worker.get("/healthcheck").json()
    assert health["status"] == "pass"
    assert health["details"]["queue"]["connected"] is True
    eventually(lambda: bus.consumers() == 1, START_DEADLINE,
             message="the worker to consume its queue")

    # It really consumes: an orchestrator report about a flow it does not know is acked.
    bus.publish("flow.started", "0123456789abcdef01234567")

    def consumed() -> bool:
        text = worker.get("/metrics").text
        return 'flow_repository_events_consumed_total{name="flow.started",outcome="applied"} 1.0' \
            in text

    eventually(consumed, 15, message="the worker to count the consumed event")
    metrics = worker.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "flow_repository_flows" in metrics.text
    missing = worker.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == 404

    signalled = time.monotonic()
    assert worker.terminate(10) == 0
    assert time.monotonic() - signalled < MARGIN
    eventually(lambda: bus.consumers() == 0, 10,
             message="the worker's consumer to leave the queue")
    try:
        requests.get(worker.url("/livez"), timeout=2)
        raise AssertionError("the health port is still open after exit")
    except requests.ConnectionError:
        pass
    assert "worker stopped" in worker.stderr()
