"""The operator kit in deploy/monitoring/: every metric the dashboard and the alerts name is
one the service exports (scraped from the real app's /metrics and the worker's health port)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import yaml
from bson import ObjectId

from flow_repository.adapters.store import utcnow
from flow_repository.entrypoints.consumer import StatusConsumer
from flow_repository.server.bootstrap import Runtime
from worker.main import health_server

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheus-rules.yaml"
# What a PromQL expression holds besides metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a deliberately plain reading: strings,
    label matchers, ranges, grouping clauses and function calls removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", text)  # function names
    names = set(re.findall(r"\b[a-zA-Z_:][\w:]*\b", text))
    return {name for name in names if name.lower() not in KEYWORDS}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels += panel.get("panels", [])
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    (rule,) = list(yaml.safe_load_all(RULES.read_text(encoding="utf-8")))
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    return [item for group in rule["spec"]["groups"] for item in group["rules"]]


def exported(text: str) -> set[str]:
    """Every sample name a Prometheus text exposition declares (from its TYPE lines, so a
    labelled family with no sample yet counts too)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        base = name.removesuffix("_total") if kind == "counter" else name
        names |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return names


@pytest.fixture
def worker_metrics(settings, store) -> Iterator[str]:
    """The /metrics text of a worker runtime (consumer, relay, reconciler; none started)
    from its real health server."""
    runtime = Runtime.build(settings, store=store, relay=True, consumer=StatusConsumer,
                            reconciler=True)
    server = health_server(runtime, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield requests.get(f"http://127.0.0.1:{server.server_address[1]}/metrics",
                           timeout=5).text
    finally:
        server.shutdown()
        server.server_close()


def test_the_plain_promql_reading_finds_the_metric_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(a_bucket{status=~"5.."}'
            '[$__rate_interval]))) / (sum(b) or vector(0)) > 0.05')
    assert metric_names(expr) == {"a_bucket", "b"}


def test_every_metric_the_dashboard_and_alerts_name_is_exported(client, worker_metrics) -> None:
    api = client.get("/metrics")
    assert api.status_code == 200
    names = exported(api.get_data(as_text=True)) | exported(worker_metrics)
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    assert len(expressions) >= 15
    named = set().union(*(metric_names(expr) for expr in expressions))
    assert named, "no metric found in the dashboard and the alerts"
    assert named <= names, sorted(named - names)


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    named = set().union(*(metric_names(expr) for expr in dashboard_expressions()))
    assert {
        "flow_repository_http_requests_total",  # requests and errors by route
        "flow_repository_http_request_duration_seconds_bucket",  # latency
        "flow_repository_outbox_pending_events", "flow_repository_outbox_oldest_pending_seconds",
        "flow_repository_events_published_total",  # relay rate
        "flow_repository_events_consumed_total", "flow_repository_events_dead_lettered_total",
        "flow_repository_flows", "flow_repository_flows_overdue",
    } <= named


def test_the_alerts_cover_outbox_dead_letters_stuck_flows_worker_and_errors() -> None:
    rules = alert_rules()
    by_metric: dict[str, set[str]] = {}
    for rule in rules:
        assert rule["alert"].startswith("FlowRepository")
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, set()).add(rule["alert"])
    assert set(by_metric) == {
        "flow_repository_outbox_oldest_pending_seconds",
        "flow_repository_events_dead_lettered_total",
        "flow_repository_flows_overdue",
        "flow_repository_consumers",
        "flow_repository_http_requests_total",
    }


def test_overdue_flows_are_counted_per_status_beyond_their_timeout(settings, store) -> None:
    runtime = Runtime.build(settings.replace(start_timeout_seconds=60,
                                             stop_timeout_seconds=600), store=store)
    old = utcnow() - timedelta(seconds=120)
    for status, changed, retries in (("starting", old, 0), ("starting", old, 1),
                                     ("starting", utcnow(), 0), ("stopping", old, 0)):
        store.insert({"_id": ObjectId(), "name": "f", "graph": {"nodes": [], "edges": []},
                      "owners": [{"id": "u", "type": "user"}], "status": status,
                      "statusChangedAt": changed, "statusRetries": retries, "revision": 1,
                      "createdAt": changed, "updatedAt": changed})
    # starting: two beyond 60 s; stopping: 120 s is within its 600 s
    assert runtime.overdue_counts() == {"starting": 2, "stopping": 0}
    text = runtime.metrics_text().decode()
    assert 'flow_repository_flows_overdue{status="starting"} 2.0' in text
    assert 'flow_repository_flows_overdue{status="stopping"} 0.0' in text
