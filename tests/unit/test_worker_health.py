"""The worker's own health port: liveness follows the consumer thread, readiness the queue."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import requests

from flow_repository.server.bootstrap import Runtime
from worker.main import health_server


@pytest.fixture
def worker_health(settings, store) -> Iterator[tuple[str, Runtime]]:
    """A worker runtime whose consumer is a stand-in, behind its real health server."""
    runtime = Runtime.build(settings, store=store)
    runtime.consumer = SimpleNamespace(alive=True, connected=True, consuming=True)
    server = health_server(runtime, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", runtime
    server.shutdown()
    server.server_close()


def test_a_running_consumer_is_live_and_ready(worker_health) -> None:
    url, _ = worker_health
    assert requests.get(f"{url}/livez", timeout=5).json() == {"status": "pass"}
    ready = requests.get(f"{url}/healthcheck", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "pass"
    metrics = requests.get(f"{url}/metrics", timeout=5)
    assert metrics.status_code == 200
    assert "flow_repository_events_consumed_total" in metrics.text


def test_a_dead_consumer_thread_fails_liveness(worker_health) -> None:
    url, runtime = worker_health
    runtime.consumer.alive = False
    response = requests.get(f"{url}/livez", timeout=5)
    assert response.status_code == 503
    assert response.json() == {"status": "fail"}


def test_a_disconnected_consumer_is_not_ready(worker_health) -> None:
    url, runtime = worker_health
    runtime.consumer.connected = False
    response = requests.get(f"{url}/healthcheck", timeout=5)
    assert response.status_code == 503
    assert response.json()["details"]["queue"] == {"status": "fail", "connected": False}


def test_unknown_paths_are_json_404(worker_health) -> None:
    url, _ = worker_health
    response = requests.get(f"{url}/nope", timeout=5)
    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "Not Found", "code": 404}]}


def test_metrics_need_the_metrics_token_when_one_is_set(settings, store) -> None:
    runtime = Runtime.build(settings.replace(metrics_token="scrape-secret"), store=store)
    runtime.consumer = SimpleNamespace(alive=True, connected=True, consuming=True)
    server = health_server(runtime, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-secret"}):
            refused = requests.get(url, headers=headers, timeout=5)
            assert refused.status_code == 401
            assert refused.json()["errors"][0]["code"] == 401
        allowed = requests.get(url, headers={"Authorization": "Bearer scrape-secret"}, timeout=5)
        assert allowed.status_code == 200
        assert "flow_repository_events_consumed_total" in allowed.text
    finally:
        server.shutdown()
        server.server_close()
