"""Trace context without a broker: strict traceparent parsing, the outbox, history and logs
carrying a request's trace with tracing off and on, the relay's headers and spans, an
exporter that fails, and a process without the OpenTelemetry SDK."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from bson import ObjectId
from flask import request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from flow_repository.adapters.outbox import pending_event
from flow_repository.adapters.relay import OutboxRelay
from flow_repository.adapters.tracing import (
    SHUTDOWN_SECONDS,
    Tracing,
    build_tracing,
    tracing_with,
)
from flow_repository.domain import trace
from flow_repository.entrypoints.app import create_app
from flow_repository.server.access_log import JsonAccessLogger
from flow_repository.settings import Settings, SettingsError

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("header", [
    TRACEPARENT,
    f"00-{TRACE_ID}-{PARENT_ID}-00",  # not sampled: still carried on
    f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-adds",  # a later version's extra fields
    f" {TRACEPARENT}\t",  # optional blanks around a header value
])
def test_a_valid_traceparent_is_read(header: str) -> None:
    context = trace.parse(header)
    assert context is not None
    assert (context.trace_id, context.span_id) == (TRACE_ID, PARENT_ID)
    assert context.traceparent.startswith(f"00-{TRACE_ID}-{PARENT_ID}-")


@pytest.mark.parametrize("header", [
    None, "", "garbage", 42, b"\xff" * 60,
    TRACEPARENT.upper(),  # uppercase hex is invalid
    f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has exactly four fields
    f"cc-{TRACE_ID}-{PARENT_ID}-01x",  # a later version's fields follow a dash
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    f"00_{TRACE_ID}_{PARENT_ID}_01",
    f"00-{TRACE_ID}-{PARENT_ID}-0g",
    TRACEPARENT + "-" + "x" * 600,  # longer than any header worth reading
    "00-" + "\u0661" * 32 + f"-{PARENT_ID}-01",  # digits that are not ASCII
])
def test_a_malformed_traceparent_is_ignored(header: Any) -> None:
    assert trace.parse(header) is None


def test_tracestate_is_kept_when_valid_and_dropped_alone_when_not() -> None:
    assert trace.parse(TRACEPARENT, "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7").state == \
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert trace.parse(TRACEPARENT, "tenant@vendor=x").state == "tenant@vendor=x"
    for bad in ("no-equals", "UPPER=1", "a=1,a=2", "a=" + "x" * 600, "a=b=c",
                ",".join(f"k{i}=v" for i in range(33))):
        context = trace.parse(TRACEPARENT, bad)
        assert context is not None and context.state is None, bad


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(spans: InMemorySpanExporter) -> Iterator[Tracing]:
    """Tracing on, every span kept in memory as it ends."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield tracing_with(provider)
    provider.shutdown()



def stored(app, flow_id: str) -> dict:
    return app.extensions["flow_repository"].store.get(ObjectId(flow_id))


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"


# ----------------------------------------------------------------------------- tracing off


def test_tracing_is_off_unless_an_exporter_is_named(settings: Settings) -> None:
    assert not build_tracing(settings).enabled
    assert not build_tracing(settings.replace(otel_traces_exporter="none")).enabled
    assert not build_tracing(settings.replace(otel_traces_exporter="console",
                                              otel_sdk_disabled=True)).enabled
    on = build_tracing(settings.replace(otel_traces_exporter="console"))
    assert on.enabled
    on.shutdown()


def test_spans_name_the_service_as_otel_service_name_says(settings, monkeypatch) -> None:
    console = settings.replace(otel_traces_exporter="console")
    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(variable, raising=False)
    names = []
    for variable, value in ((None, None), ("OTEL_SERVICE_NAME", "flows-eu"),
                            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=flows-us,team=ops")):
        if variable:
            monkeypatch.setenv(variable, value)
        tracing = build_tracing(console)
        names.append(tracing._provider.resource.attributes["service.name"])
        tracing.shutdown()
        if variable:
            monkeypatch.delenv(variable)
    assert names == ["flow-repository", "flows-eu", "flows-us"]


def test_unknown_exporters_and_protocols_are_refused_at_start_up() -> None:
    with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER"):
        Settings.from_env({"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        Settings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_with_tracing_off_a_request_traceparent_reaches_outbox_history_and_logs(
        client, auth, flow_body, app, log_lines) -> None:
    created = client.post("/flows", json=flow_body(),
                          headers={**auth(), "traceparent": TRACEPARENT,
                                   "tracestate": "congo=t61rcWkgMzE"})
    assert created.status_code == 201
    flow_id = created.get_json()["data"]["id"]
    (event,) = stored(app, flow_id)["outbox"]
    # not traced here: the caller's context goes on as it came
    assert event["traceparent"] == TRACEPARENT
    assert event["tracestate"] == "congo=t61rcWkgMzE"
    (entry,) = client.get(f"/flows/{flow_id}/revisions", headers=auth()).get_json()["data"]
    assert entry["traceId"] == TRACE_ID
    (line,) = [line for line in log_lines() if line["message"] == "flow created"]
    assert (line["traceId"], line["spanId"]) == (TRACE_ID, PARENT_ID)


def test_a_malformed_traceparent_is_ignored_never_stored_never_an_error(
        client, auth, flow_body, app, log_lines) -> None:
    created = client.post("/flows", json=flow_body(),
                          headers={**auth(), "traceparent": TRACEPARENT.upper() + "<script>"})
    assert created.status_code == 201
    flow_id = created.get_json()["data"]["id"]
    (event,) = stored(app, flow_id)["outbox"]
    assert "traceparent" not in event and "tracestate" not in event
    (entry,) = client.get(f"/flows/{flow_id}/revisions", headers=auth()).get_json()["data"]
    assert "traceId" not in entry
    assert client.get(f"/flows/{flow_id}", headers={**auth(), "traceparent": "x" * 10_000}
                      ).status_code == 200
    assert not any("traceId" in line for line in log_lines())


def test_without_a_trace_nothing_is_added(client, auth, flow_body, app, log_lines) -> None:
    created = client.post("/flows", json=flow_body(), headers=auth())
    (event,) = stored(app, created.get_json()["data"]["id"])["outbox"]
    assert "traceparent" not in event
    assert not any("traceId" in line for line in log_lines())


def test_the_access_log_names_the_request_trace() -> None:
    written: list[str] = []
    logger = SimpleNamespace(access_log_enabled=True,
                             access_log=SimpleNamespace(info=written.append))
    response = SimpleNamespace(status="200 OK", headers=[], sent=10)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/flows",
               trace.ENVIRON_KEY: trace.parse(TRACEPARENT)}
    JsonAccessLogger.access(logger, response, None, environ, timedelta(milliseconds=3))
    JsonAccessLogger.access(logger, response, None, {"REQUEST_METHOD": "GET"},
                            timedelta(milliseconds=3))
    traced, plain = (json.loads(line) for line in written)
    assert (traced["traceId"], traced["spanId"]) == (TRACE_ID, PARENT_ID)
    assert "traceId" not in plain and "spanId" not in plain


def test_the_wsgi_environ_keeps_the_request_trace_for_the_access_log(app, client,
                                                                     auth) -> None:
    seen: dict[str, Any] = {}

    @app.after_request
    def keep(response):
        seen.update(request.environ)
        return response

    client.get("/flows", headers={**auth(), "traceparent": TRACEPARENT})
    assert seen[trace.ENVIRON_KEY] == trace.parse(TRACEPARENT)


# ----------------------------------------------------------------------------- tracing on


def test_with_tracing_on_the_request_span_continues_the_caller_and_the_outbox_stores_it(
        settings, store, auth, flow_body, spans, tracing, log_lines) -> None:
    app = create_app(settings, store=store, tracing=tracing)
    logging.getLogger().setLevel(logging.INFO)  # create_app set the settings' level
    client = app.test_client()
    created = client.post("/flows", json=flow_body(),
                          headers={**auth(), "traceparent": TRACEPARENT})
    assert created.status_code == 201
    flow_id = created.get_json()["data"]["id"]
    finished = spans.get_finished_spans()
    (request,) = [span for span in finished if span.kind == SpanKind.SERVER]
    assert request.name == "POST /flows"
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    assert hex_id(request.parent.span_id, 16) == PARENT_ID and request.parent.is_remote
    assert request.attributes["http.route"] == "/flows"
    assert request.attributes["http.response.status_code"] == 201
    (insert,) = [span for span in finished if span.name == "store.insert"]
    assert insert.kind == SpanKind.CLIENT and insert.parent.span_id == request.context.span_id
    assert insert.attributes["db.operation"] == "insert"
    # the outbox holds the service's own span: the publish will be its child
    (event,) = stored(app, flow_id)["outbox"]
    assert event["traceparent"] == f"00-{TRACE_ID}-{hex_id(request.context.span_id, 16)}-01"
    (line,) = [line for line in log_lines() if line["message"] == "flow created"]
    assert line["traceId"] == TRACE_ID
    assert line["spanId"] == hex_id(request.context.span_id, 16)


def test_with_tracing_on_a_request_without_traceparent_starts_a_trace(
        settings, store, auth, flow_body, spans, tracing) -> None:
    client = create_app(settings, store=store, tracing=tracing).test_client()
    flow_id = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]["id"]
    assert client.get(f"/flows/{flow_id}", headers=auth()).status_code == 200
    post, get = [span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert post.parent is None and get.parent is None
    assert post.context.trace_id != get.context.trace_id
    assert get.name == "GET /flows/<flow_id>"
    (entry,) = client.get(f"/flows/{flow_id}/revisions", headers=auth()).get_json()["data"]
    assert entry["traceId"] == hex_id(post.context.trace_id, 32)


def test_an_unmatched_request_is_a_span_named_after_its_method_and_probes_make_none(
        settings, store, spans, tracing) -> None:
    client = create_app(settings, store=store, tracing=tracing).test_client()
    assert client.get("/nowhere").status_code == 404
    for probe in ("/livez", "/healthcheck", "/metrics"):
        assert client.get(probe).status_code == 200
    (request,) = spans.get_finished_spans()
    assert request.name == "GET" and "http.route" not in request.attributes
    assert request.attributes["http.response.status_code"] == 404 and request.status.is_ok
    # a probe that carries a traceparent still takes part in that trace
    assert client.get("/livez", headers={"traceparent": TRACEPARENT}).status_code == 200
    assert spans.get_finished_spans()[-1].name == "GET /livez"


def test_store_writes_outside_a_trace_make_no_span(settings, store, auth, flow_body, spans,
                                                  tracing) -> None:
    app = create_app(settings, store=store, tracing=tracing)
    flow_id = app.test_client().post("/flows", json=flow_body(), headers=auth()
                                     ).get_json()["data"]["id"]
    before = len(spans.get_finished_spans())
    traced_store = app.extensions["flow_repository"].store
    assert traced_store.wrapped is store
    # a background loop's write (the reconciler's, the relay's): no orphan trace
    traced_store.drop_pending_history(ObjectId(flow_id), [])
    assert len(spans.get_finished_spans()) == before


def test_a_failing_request_marks_its_span_as_an_error(settings, down_store, auth, spans,
                                                      tracing) -> None:
    client = create_app(settings, store=down_store, tracing=tracing).test_client()
    assert client.get(f"/flows/{ObjectId()}", headers=auth()).status_code == 503
    (request,) = [span for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert not request.status.is_ok


class FailingExporter(SpanExporter):
    """An exporter whose backend is broken: every export raises."""

    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans) -> SpanExportResult:
        self.calls += 1
        raise ConnectionError("collector unreachable")

    def shutdown(self) -> None:
        pass


def test_a_broken_exporter_never_fails_a_request(settings, store, auth, flow_body,
                                                 unused_port: int) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    failing = FailingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(failing))  # raises inside the request
    provider.add_span_processor(BatchSpanProcessor(  # nothing listens at this endpoint
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{unused_port}/v1/traces", timeout=1)))
    client = create_app(settings, store=store, tracing=tracing_with(provider)).test_client()
    for _ in range(3):
        created = client.post("/flows", json=flow_body(),
                              headers={**auth(), "traceparent": TRACEPARENT})
        assert created.status_code == 201
        flow_id = created.get_json()["data"]["id"]
        assert client.get(f"/flows/{flow_id}", headers=auth()).status_code == 200
    assert failing.calls >= 6
    provider.shutdown()


def test_the_otlp_exporter_of_the_settings_is_built_and_fails_quietly(
        settings, store, auth, flow_body, unused_port, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{unused_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    for protocol in ("http/protobuf", "grpc"):
        custom = settings.replace(otel_traces_exporter="otlp",
                                  otel_exporter_otlp_protocol=protocol)
        app = create_app(custom, store=store)
        runtime = app.extensions["flow_repository"]
        assert runtime.tracing.enabled and runtime.owns_tracing
        client = app.test_client()
        assert client.post("/flows", json=flow_body(), headers=auth()).status_code == 201
        started = time.monotonic()
        runtime.stop()  # waits for the collector a short while at most, and never raises
        assert time.monotonic() - started < SHUTDOWN_SECONDS + 2


# ----------------------------------------------------------------------------- the relay


class HeaderRecordingPublisher:
    """Stands in for RabbitMQ: confirms everything and keeps each message's AMQP headers."""

    exchange = "event-bus"
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[dict, dict]] = []

    def publish_batch(self, messages, deadline: float, headers=None) -> int:
        self.sent += list(zip(messages, headers or [{}] * len(messages), strict=True))
        return len(messages)

    def connect(self) -> None:
        pass


def relay_one(store, tracing: Tracing | None, event: dict) -> HeaderRecordingPublisher:
    flow_id = ObjectId()
    store.insert({"_id": flow_id, "name": "f", "graph": {"nodes": [], "edges": []},
                  "owners": [], "status": "inactive", "revision": 1, "outbox": [event]})
    publisher = HeaderRecordingPublisher()
    OutboxRelay(store, publisher, tracing=tracing).publish_pending()
    return publisher


def test_the_relay_sends_the_stored_trace_context_as_message_headers(store) -> None:
    with trace.use(trace.parse(TRACEPARENT, "congo=t61rcWkgMzE")):
        event = pending_event("flow.starting", status="starting")
    ((message, headers),) = relay_one(store, None, event).sent
    assert headers == {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
    assert "traceparent" not in message["headers"]  # the OIH body is as it was


def test_an_event_without_a_trace_goes_out_without_trace_headers(store) -> None:
    ((_, headers),) = relay_one(store, None, pending_event("flow.stopping")).sent
    assert headers == {}


def test_a_stored_traceparent_is_checked_again_before_it_is_sent(store) -> None:
    event = {**pending_event("flow.stopping"), "traceparent": "00-not-a-trace"}
    ((_, headers),) = relay_one(store, None, event).sent
    assert headers == {}


def test_with_tracing_on_each_publish_is_a_producer_span_child_of_the_stored_context(
        store, spans, tracing) -> None:
    with trace.use(trace.parse(TRACEPARENT)):
        event = pending_event("flowrepo.flow.created", {"flowId": "x"})
    ((_, headers),) = relay_one(store, tracing, event).sent
    (publish,) = [span for span in spans.get_finished_spans() if span.kind == SpanKind.PRODUCER]
    assert publish.name == "flowrepo.flow.created publish"
    assert hex_id(publish.context.trace_id, 32) == TRACE_ID
    assert hex_id(publish.parent.span_id, 16) == PARENT_ID
    assert publish.attributes["messaging.message.id"] == event["eventId"]
    # the message continues from the publish span
    assert headers["traceparent"] == f"00-{TRACE_ID}-{hex_id(publish.context.span_id, 16)}-01"


# ----------------------------------------------------------------------------- no SDK


BLOCK_OPENTELEMETRY = """
import sys


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r}")


sys.meta_path.insert(0, Block())
from flow_repository.adapters import tracing
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings

assert tracing.otel_trace is None
settings = Settings.from_env({}, embedded_db_path=":memory:", dev_token_secret_file=sys.argv[1],
                             otel_traces_exporter="otlp")
app = create_app(settings)
assert not app.extensions["flow_repository"].tracing.enabled
answer = app.test_client().get("/healthcheck", headers={"traceparent": sys.argv[2]})
assert answer.status_code == 200, answer.status_code
print("served without the SDK")
"""


def test_without_the_sdk_the_service_runs_and_tracing_stays_off(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_OPENTELEMETRY,
                             str(tmp_path / "secret"), TRACEPARENT],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "served without the SDK" in result.stdout
    assert "OpenTelemetry SDK is not installed" in result.stderr
