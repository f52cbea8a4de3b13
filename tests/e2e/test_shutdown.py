"""Graceful shutdown on SIGTERM of the real API and worker processes, within a pod's grace period."""

from __future__ import annotations

import signal
import threading
import time

import requests

from .conftest import START_DEADLINE, Bus, FakeIam, base_env, bearer, free_port, wait_for

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
    wait_for(lambda: len(iam.calls) == len(tokens), 10, "every request to reach IAM")

    signalled = time.monotonic()
    api.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "Handling signal: term" in api.stderr(), 10, "gunicorn to take SIGTERM")
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


def test_api_exits_promptly_on_sigterm_while_rabbitmq_is_away(serve, broker_proxy) -> None:
    api = serve(QUEUE_URL=f"amqp://guest:guest@127.0.0.1:{broker_proxy.port}/%2F")
    wait_for(lambda: api.get("/healthcheck").json()["status"] == "pass", START_DEADLINE,
             "the API to connect through the proxy")
    broker_proxy.cut()
    wait_for(lambda: api.get("/healthcheck").json()["status"] == "warn", 20,
             "the API to notice the outage")
    signalled = time.monotonic()
    assert api.terminate(GRACE + MARGIN) == 0
    assert time.monotonic() - signalled < GRACE + MARGIN


def test_worker_serves_health_and_stops_on_sigterm(spawn, settings, bus: Bus, tmp_path) -> None:
    port = free_port()
    env = {**base_env(tmp_path / "home"), "QUEUE_URL": settings.queue_url,
           "EVENT_EXCHANGE": settings.event_exchange, "EVENT_QUEUE": settings.event_queue,
           "WORKER_HEALTH_PORT": str(port), "LOG_LEVEL": "INFO"}
    worker = spawn(["worker"], env, port)
    worker.wait_ready("/livez")
    assert worker.get("/livez").json() == {"status": "pass"}
    wait_for(lambda: worker.get("/healthcheck").status_code == 200, START_DEADLINE,
             "the worker's /healthcheck to pass")
    health = worker.get("/healthcheck").json()
    assert health["status"] == "pass"
    assert health["details"]["queue"]["connected"] is True
    wait_for(lambda: bus.consumers(settings.event_queue) == 1, START_DEADLINE,
             "the worker to consume its queue")

    # It really consumes: an orchestrator report about a flow it does not know is acked.
    bus.publish("flow.started", {"id": "0123456789abcdef01234567"})

    def consumed() -> bool:
        text = worker.get("/metrics").text
        return 'flow_repository_events_consumed_total{name="flow.started",outcome="applied"} 1.0' \
            in text

    wait_for(consumed, 15, "the worker to count the consumed event")
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
    wait_for(lambda: bus.consumers(settings.event_queue) == 0, 10,
             "the worker's consumer to leave the queue")
    try:
        requests.get(worker.url("/livez"), timeout=2)
        raise AssertionError("the health port is still open after exit")
    except requests.ConnectionError:
        pass
    assert "worker stopped" in worker.stderr()
