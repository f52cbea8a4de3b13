"""One trace from the request to the orchestrator and back, on the real RabbitMQ: the
request's trace context crosses the outbox into the messages' headers, and a report that
carries it is applied in the same trace, with tracing on (spans in memory) and off."""

from __future__ import annotations

import logging

import pytest
from bson import ObjectId
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from flow_repository.adapters.tracing import tracing_with
from flow_repository.domain import trace
from support import eventually

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"



def revisions(client, auth, flow_id: str) -> list[dict]:
    return client.get(f"/flows/{flow_id}/revisions", headers=auth()).get_json()["data"]


def test_one_trace_spans_request_store_write_publish_and_the_report(
        make_app, listener, bus, store, auth, flow_body) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    events = listener("flowrepo.flow.created", "flow.starting")
    deployment = make_app(tracing=tracing_with(provider))
    client = deployment.client
    headers = {**auth(), "traceparent": TRACEPARENT}

    created = client.post("/flows", json=flow_body(), headers=headers)
    assert created.status_code == 201
    flow_id = created.get_json()["data"]["id"]
    assert client.post(f"/flows/{flow_id}/start", headers=headers).status_code == 200
    (created_message,) = events.wait("flowrepo.flow.created", flow_id)
    (starting,) = events.wait("flow.starting", flow_id)
    for message in (created_message, starting):
        context = trace.parse(message.properties.headers["traceparent"])
        assert context is not None and context.trace_id == TRACE_ID

    # The orchestrator answers in the trace the flow.starting message carried.
    bus.publish("flow.started", flow_id,
                headers={"traceparent": starting.properties.headers["traceparent"]})
    eventually(lambda: store.get(ObjectId(flow_id))["status"] == "active", timeout=15,
               message="flow.started applied")
    eventually(lambda: any(span.kind == SpanKind.CONSUMER
                           for span in spans.get_finished_spans()), timeout=5,
               message="the consumer's span ended")

    traced = [span for span in spans.get_finished_spans()
              if hex_id(span.context.trace_id, 32) == TRACE_ID]
    by_id = {span.context.span_id: span for span in traced}

    def parent_of(span):
        return by_id.get(span.parent.span_id) if span.parent else None

    (start_request,) = [span for span in traced if span.kind == SpanKind.SERVER
                        and span.name == "POST /flows/<flow_id>/start"]
    assert hex_id(start_request.parent.span_id, 16) == CALLER_SPAN
    (write,) = [span for span in traced if span.name == "store.update"
                and parent_of(span) is start_request]
    assert write.kind == SpanKind.CLIENT
    (publish,) = [span for span in traced if span.name == "flow.starting publish"]
    assert publish.kind == SpanKind.PRODUCER
    assert parent_of(publish) is start_request  # across the outbox, from the relay thread
    assert starting.properties.headers["traceparent"] == \
        f"00-{TRACE_ID}-{hex_id(publish.context.span_id, 16)}-01"
    (report,) = [span for span in traced if span.kind == SpanKind.CONSUMER]
    assert report.name == "flow.started process"
    assert parent_of(report) is publish
    assert report.attributes["flow_repository.outcome"] == "applied"
    assert any(span.name == "store.update" and parent_of(span) is report for span in traced)
    assert any(span.name == "flowrepo.flow.created publish" for span in traced)

    # Every change of the flow was made in this trace, and its history says so.
    assert [entry["traceId"] for entry in revisions(client, auth, flow_id)] == [TRACE_ID] * 3
    provider.shutdown()


def test_with_tracing_off_the_messages_carry_the_request_trace_and_a_log_line_names_it(
        make_app, listener, bus, store, auth, flow_body, log_lines) -> None:
    events = listener("flowrepo.flow.created", "flow.starting", "flow.stopping")
    deployment = make_app()
    assert not deployment.runtime.tracing.enabled
    logging.getLogger().setLevel(logging.INFO)
    client = deployment.client
    headers = {**auth(), "traceparent": TRACEPARENT, "tracestate": "rojo=00f067aa0ba902b7"}

    flow_id = client.post("/flows", json=flow_body(), headers=headers).get_json()["data"]["id"]
    assert client.post(f"/flows/{flow_id}/start", headers=headers).status_code == 200
    for name in ("flowrepo.flow.created", "flow.starting"):
        (message,) = events.wait(name, flow_id)
        # not traced here: the caller's context goes on unchanged
        assert message.properties.headers == {"traceparent": TRACEPARENT,
                                              "tracestate": "rojo=00f067aa0ba902b7"}
    (line,) = [line for line in log_lines() if line["message"] == "flow created"]
    assert (line["traceId"], line["spanId"]) == (TRACE_ID, CALLER_SPAN)

    # A failure report in the orchestrator's own trace: the stop it causes carries that trace.
    orchestrator = f"00-{'1' * 32}-{'2' * 16}-01"
    bus.publish("flow.started", flow_id, headers={"traceparent": TRACEPARENT})
    eventually(lambda: store.get(ObjectId(flow_id))["status"] == "active", timeout=15,
               message="flow.started applied")
    bus.publish("flow.failed", flow_id, headers={"traceparent": orchestrator})
    (stopping,) = events.wait("flow.stopping", flow_id)
    assert stopping.properties.headers == {"traceparent": orchestrator}
    assert [entry["traceId"] for entry in revisions(client, auth, flow_id)] == \
        ["1" * 32, TRACE_ID, TRACE_ID, TRACE_ID]


def test_a_report_with_a_malformed_traceparent_is_applied_without_a_trace(
        make_app, listener, bus, store, auth, flow_body) -> None:
    deployment = make_app()
    client = deployment.client
    flow_id = client.post("/flows", json=flow_body(), headers=auth()).get_json()["data"]["id"]
    assert client.post(f"/flows/{flow_id}/start", headers=auth()).status_code == 200
    bus.publish("flow.started", flow_id, headers={"traceparent": "00-zz-not-a-trace-01",
                                                  "tracestate": 7})
    eventually(lambda: store.get(ObjectId(flow_id))["status"] == "active", timeout=15,
               message="flow.started applied")
    assert all("traceId" not in entry for entry in revisions(client, auth, flow_id))
    assert bus.dead_letters() == []
