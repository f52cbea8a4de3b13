"""What a process reports about itself: /healthcheck for the API and the worker, /metrics."""

from __future__ import annotations

import random
import string
import uuid
from types import SimpleNamespace

import pymongo

from flow_repository.adapters.store import FlowStore, utcnow
from flow_repository.server.bootstrap import Runtime


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


def series(client) -> set[str]:
    """The labelled series /metrics exposes (sample names with their labels)."""
    text = client.get("/metrics").get_data(as_text=True)
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_random_methods_and_paths_add_no_metric_series(client) -> None:
    rng = random.Random(9)
    letters = string.ascii_letters + string.digits + "-_.~!$&'*+"

    def word(low: int, high: int) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(low, high)))

    def send_random() -> None:
        method = word(3, 12).upper()
        response = client.open(f"/r-{word(1, 30)}/{word(0, 30)}", method=method)
        assert response.status_code in (404, 405)

    send_random()  # the first unknown request creates the "other"/"unmatched" series
    series(client)  # and the first scrape its own series
    before = series(client)
    for _ in range(500):
        send_random()
    after = series(client)
    assert after == before
    assert any('method="other",route="unmatched"' in name for name in after)


def test_api_metrics_need_the_metrics_token_when_one_is_set(build_app, error_messages) -> None:
    client = build_app(metrics_token="scrape-secret").test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-secret"}):
        error_messages(client.get("/metrics", headers=headers), 401)
    allowed = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert allowed.status_code == 200
    assert "flow_repository_http_requests_total" in allowed.get_data(as_text=True)
    assert client.get("/livez").status_code == 200  # nothing else needs it


def gauge(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_flow_counts_are_read_at_most_once_per_interval_the_backlog_every_scrape(
    settings, store
) -> None:
    """/metrics does not count every flow at each scrape (METRICS_FLOW_COUNT_SECONDS)."""
    now = [100.0]
    runtime = Runtime.build(settings.replace(metrics_flow_count_seconds=15), store=store)
    runtime.clock = lambda: now[0]
    inactive = 'flow_repository_flows{status="inactive"}'
    pending = "flow_repository_outbox_pending_events"

    def add_flow() -> None:
        store.insert({"name": "n", "status": "inactive", "owners": [],
                      "outbox": [{"eventId": uuid.uuid4().hex, "storedAt": utcnow()}]})

    add_flow()
    text = runtime.metrics_text().decode()
    assert (gauge(text, inactive), gauge(text, pending)) == (1, 1)
    add_flow()
    now[0] += 14.9
    text = runtime.metrics_text().decode()
    assert (gauge(text, inactive), gauge(text, pending)) == (1, 2)  # counts still cached
    now[0] += 0.1
    text = runtime.metrics_text().decode()
    assert (gauge(text, inactive), gauge(text, pending)) == (2, 2)
