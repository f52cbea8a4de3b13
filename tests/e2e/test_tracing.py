"""A served deployment (``serve`` and a ``worker``) carries a request's W3C trace context to
the broker's messages and names it in its log lines, the access log included; with tracing
on (an OTLP collector that is down) as with tracing off."""

from __future__ import annotations

import json

import pytest

from flow_repository.domain import trace
from support import eventually, free_port

pytestmark = pytest.mark.e2e

TRACE_ID = "5cf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
ORCHESTRATOR_TRACE = "6df92f3577b34da6a3ce929d0e0e4737"


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return [line for line in lines if isinstance(line, dict)]


@pytest.mark.parametrize("tracing", ["off", "on"])
def test_a_request_traceparent_reaches_the_messages_and_the_log_lines(
        tracing, launch, process_env, listener, bus, auth, flow_body) -> None:
    env = {**process_env, "LOG_LEVEL": "INFO"}
    if tracing == "on":  # a collector that is down: nothing may fail for it
        env.update(OTEL_TRACES_EXPORTER="otlp",
                   OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                   OTEL_EXPORTER_OTLP_TIMEOUT="1")
    events = listener("flowrepo.flow.created", "flow.starting")
    deployment = launch(env, workers=1)
    api = deployment.api
    headers = {**auth(), "traceparent": TRACEPARENT}
    created = api.request("POST", "/flows", json=flow_body(), headers=headers)
    assert created.status_code == 201, created.text
    flow_id = created.json()["data"]["id"]
    assert api.request("POST", f"/flows/{flow_id}/start", headers=headers).status_code == 200
    for name in ("flowrepo.flow.created", "flow.starting"):
        (message,) = events.wait(name, flow_id)
        context = trace.parse(message.properties.headers["traceparent"])
        assert context is not None and context.trace_id == TRACE_ID
        if tracing == "off":
            assert message.properties.headers["traceparent"] == TRACEPARENT

    # the orchestrator's report, in a trace of its own, is applied by the worker in it
    bus.publish("flow.started", flow_id,
                headers={"traceparent": f"00-{ORCHESTRATOR_TRACE}-{'3' * 16}-01"})
    eventually(lambda: api.get(f"/flows/{flow_id}", headers=auth()).json()["data"]["status"]
               == "active", timeout=30, message="flow.started applied by the worker")
    history = api.get(f"/flows/{flow_id}/revisions", headers=auth()).json()["data"]
    assert [entry.get("traceId") for entry in history] == \
        [ORCHESTRATOR_TRACE, TRACE_ID, TRACE_ID]

    assert api.get("/livez").status_code == 200  # flushes the access log
    access = json_lines(api.stdout_path.read_text(errors="replace"))
    (post,) = [line for line in access
               if line.get("method") == "POST" and line.get("path") == "/flows"]
    assert post["traceId"] == TRACE_ID and len(post["spanId"]) == 16
    (created_line,) = [line for line in json_lines(api.stderr())
                       if line.get("message") == "flow created"]
    assert created_line["traceId"] == TRACE_ID
    assert all("traceId" not in line for line in access if line.get("path") == "/livez")
