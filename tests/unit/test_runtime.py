"""What a process reports about itself: /healthcheck for the API and the worker, /metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pymongo

from flow_repository.runtime import Runtime
from flow_repository.store import FlowStore


def runtime_with_queue(settings, store, connected: bool) -> Runtime:
    runtime = Runtime.build(settings, store=store)
    runtime.relay = SimpleNamespace(connected=connected)
    return runtime


def test_all_up_passes_for_the_api_and_the_worker(settings, store) -> None:
    runtime = runtime_with_queue(settings, store, connected=True)
    for queue_required in (False, True):
        status, body = runtime.health(queue_required=queue_required)
        assert status == 200
        assert body["status"] == "pass"
        assert body["details"]["queue"] == {"status": "pass", "connected": True}


def test_a_queue_outage_is_a_warning_for_the_api_and_a_failure_for_the_worker(
    settings, store
) -> None:
    runtime = runtime_with_queue(settings, store, connected=False)
    assert runtime.health(queue_required=False)[0] == 200
    assert runtime.health(queue_required=False)[1]["status"] == "warn"
    status, body = runtime.health(queue_required=True)
    assert status == 503
    assert body["status"] == "fail"
    assert body["details"]["queue"] == {"status": "fail", "connected": False}
    assert body["details"]["mongoDB"] == {"status": "pass"}


def test_mongodb_down_fails_both_without_naming_hosts(settings) -> None:
    client = pymongo.MongoClient("mongodb://127.0.0.1:1", serverSelectionTimeoutMS=100)
    runtime = runtime_with_queue(settings, FlowStore(client["x"]), connected=True)
    for queue_required in (False, True):
        status, body = runtime.health(queue_required=queue_required)
        assert status == 503
        assert body["status"] == "fail"
        assert body["details"]["mongoDB"]["status"] == "fail"
        assert "127.0.0.1" not in body["details"]["mongoDB"]["error"]
    text = runtime.metrics_text().decode()  # still scrapeable while MongoDB is away
    assert "flow_repository_http_requests_total" in text
