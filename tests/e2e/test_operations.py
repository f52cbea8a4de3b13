"""Operating the served process: Prometheus metrics, and README's bare run command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import Served, base_env, bearer, free_port, settings_env

from .conftest import FakeIam

pytestmark = pytest.mark.e2e


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in exposition text, None when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = ",".join(sorted(part for part in re.findall(r'\w+="[^"]*"', match.group(2) or "")))
        if found == wanted:
            return float(match.group(3))
    return None


def test_metrics_are_prometheus_text(api: Served, iam: FakeIam, flow_body) -> None:
    headers = bearer(iam.grant())
    assert api.get("/flows", headers=headers).status_code == 200
    assert api.get("/flows", headers=headers).status_code == 200
    assert api.get("/flows").status_code == 401
    for name in ("one", "two"):
        assert api.request("POST", "/flows", headers=headers,
                           json=flow_body(name)).status_code == 201

    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    assert "# TYPE flow_repository_http_requests_total counter" in text
    total = "flow_repository_http_requests_total"
    assert sample(text, total, method="GET", route="/flows", status="200") == 2.0
    assert sample(text, total, method="GET", route="/flows", status="401") == 1.0
    assert sample(text, total, method="POST", route="/flows", status="201") == 2.0
    assert "# TYPE flow_repository_flows gauge" in text
    assert sample(text, "flow_repository_flows", status="inactive") == 2.0
    assert sample(text, "flow_repository_flows", status="active") == 0.0


def test_readme_run_command_with_no_configuration(spawn, settings, tmp_path: Path) -> None:
    """Nothing configured but the port and, to keep to this test's own queue and exchange
    on the shared broker, the broker names: no identity, no MongoDB."""
    port = free_port()
    env = {**base_env(tmp_path / "home"), "PORT": str(port),
           **settings_env(settings, "queue_url", "event_exchange", "event_queue")}
    api = spawn(["serve"], env, port)
    api.wait_ready("/livez")
    assert api.get("/livez").json() == {"status": "pass"}
    # the start-up line says where the data is kept: the user's state directory
    database = tmp_path / "home" / ".local" / "state" / "flow-repository" / "flows.sqlite3"
    assert f"keeps the data in {database}" in api.stderr()
    assert database.is_file()
    refused = api.get("/flows")
    assert refused.status_code == 401, "with no identity configured the service is never open"
    assert refused.json()["errors"][0]["message"] == "Missing authorization header."
    health = api.get("/healthcheck")
    assert health.status_code == 200
    assert health.json()["details"]["mongoDB"]["status"] == "pass"
    assert api.terminate(30) == 0


def test_production_mode_runs_several_workers_and_reports_truthfully_without_mongodb(
    serve, iam: FakeIam
) -> None:
    """MONGODB_URL set (here to a port nothing listens on): the production path of serve."""
    served = serve(MONGODB_URL="mongodb://127.0.0.1:9/flows", MONGODB_TIMEOUT_MS="200",
                   WEB_CONCURRENCY="2")
    total = "flow_repository_http_requests_total"
    before = sample(served.get("/metrics").text, total, method="GET", route="/livez",
                    status="200")
    for _ in range(6):
        assert served.get("/livez").status_code == 200
    health = served.get("/healthcheck")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "fail"
    assert body["details"]["mongoDB"]["status"] == "fail"
    assert "127.0.0.1" not in body["details"]["mongoDB"]["error"]  # no topology leaked
    listing = served.get("/flows", headers=bearer(iam.grant()))
    assert listing.status_code == 503
    assert listing.json() == {"errors": [
        {"message": "Database is unavailable; retry later.", "code": 503}]}
    # two gunicorn workers; a scrape answered by either one counts the requests of both
    after = sample(served.get("/metrics").text, total, method="GET", route="/livez",
                   status="200")
    assert after - before == 6.0
    workers = re.findall(r"Booting worker with pid: (\d+)", served.stderr())
    assert len(set(workers)) == 2


def test_a_worker_facing_a_queue_declared_without_single_active_consumer_exits_3(
        spawn, service_env: dict[str, str], settings, broker) -> None:
    # as OIH's service and earlier versions of this one declared it
    arguments = {"x-queue-type": "quorum"} if settings.event_queue_type == "quorum" else None
    broker.queue_declare(settings.event_queue, durable=True, arguments=arguments)
    worker: Served = spawn(["worker"], {**service_env, "WORKER_HEALTH_PORT": str(free_port())})
    assert worker.process.wait(60) == 3  # an exit status the orchestrator shows, not a loop
    logged = worker.stderr()
    assert "worker stopped: it cannot consume" in logged
    assert settings.event_queue in logged and "x-single-active-consumer" in logged
    assert "Moving an existing queue" in logged  # the README section that moves it
    # nothing was changed: the old queue is still there as it was
    broker.queue_declare(settings.event_queue, durable=True, arguments=arguments)
