"""Tracing: spans through the OpenTelemetry SDK when OTEL_TRACES_EXPORTER asks for them.

Off (the default) a :class:`Tracing` starts no span and costs a context variable at most:
an incoming ``traceparent`` is still carried on (outbox, message headers, history, logs)
through :mod:`flow_repository.domain.trace`. On, it starts the service's spans (the
request, the store writes, each published event, each report applied) with an
OpenTelemetry tracer of its own provider, and keeps the domain's current trace context in
step with them, so the outbox stores the service's span and the logs name it.

The SDK is optional (the ``otel`` extra): without it this module still imports, and
tracing stays off with a warning when it was asked for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from flow_repository.domain import trace
from flow_repository.domain.trace import TraceContext
from flow_repository.settings import Settings

try:  # the ``otel`` extra
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )
except ImportError:  # pragma: no cover - exercised by tests that hide the package
    otel_trace = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SERVICE_NAME = "flow-repository"
INSTRUMENTATION = "flow_repository"
SHUTDOWN_SECONDS = 3.0  # how long a stopping process waits for its last spans to go out
# What a store write's span is called after; reads are not traced (they are the hot path).
TRACED_STORE_WRITES = ("insert", "update", "record_history", "finish_batch", "drop_pending_history")


_KINDS = {} if otel_trace is None else {
    "server": SpanKind.SERVER, "consumer": SpanKind.CONSUMER, "internal": SpanKind.INTERNAL}


def _state(text: str | None) -> Any:
    """An OpenTelemetry TraceState from a checked tracestate header."""
    if not text:
        return TraceState()
    return TraceState([tuple(member.split("=", 1)) for member in text.split(",")])


class Tracing:
    """The service's spans, or none. Built once per process (:func:`build_tracing`) and
    handed to the parts that start spans: the app, the store, the relay and the consumer."""

    def __init__(self, tracer: Any = None, provider: Any = None,
                 system: str = "sqlite") -> None:
        self._tracer = tracer
        self._provider = provider
        self._system = system  # db.system of the store writes' spans
        self.enabled = tracer is not None

    # ----------------------------------------------------------------- entry points

    @contextmanager
    def incoming(self, name: str, parent: TraceContext | None, *, kind: str = "server",
                 attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """The span of a request or a report, continuing ``parent`` (the caller's trace).

        Yields the span (None when off). Off, the caller's context is the current one
        for the block, as it is: its trace id and span id go on unchanged.
        """
        begun = self.begin(name, parent, kind=kind, attributes=attributes)
        try:
            yield begun[0]
        except BaseException as error:
            self.finish(begun, error)
            raise
        self.finish(begun)

    def begin(self, name: str, parent: TraceContext | None, *, kind: str = "server",
              attributes: Mapping[str, Any] | None = None) -> tuple[Any, Any, Any]:
        """:meth:`incoming` in two calls, for a caller that cannot hold a ``with`` (the
        request's hooks, on the hot path): (span or None, tokens to give back)."""
        if not self.enabled:
            return None, None, trace.enter(parent)
        span = self._tracer.start_span(name, context=self._parent(parent), kind=_KINDS[kind],
                                       attributes=attributes)
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        return span, token, trace.enter(self._context_of(span, parent))

    @staticmethod
    def finish(begun: tuple[Any, Any, Any], error: BaseException | None = None) -> None:
        """End what :meth:`begin` started; ``error``: the work failed with it."""
        span, token, current = begun
        trace.leave(current)
        if span is None:
            return
        otel_context.detach(token)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    @staticmethod
    def _parent(parent: TraceContext | None) -> Any:
        """The OpenTelemetry context a remote ``parent`` makes (an empty one: a new trace)."""
        if parent is None:
            return otel_context.Context()
        remote = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                             trace_flags=TraceFlags(parent.flags),
                             trace_state=_state(parent.state))
        return otel_trace.set_span_in_context(NonRecordingSpan(remote), otel_context.Context())

    @staticmethod
    def _context_of(span: Any, parent: TraceContext | None) -> TraceContext:
        """The W3C context of one of our spans (the caller's tracestate goes on with it)."""
        context = span.get_span_context()
        return TraceContext(f"{context.trace_id:032x}", f"{context.span_id:016x}",
                            int(context.trace_flags), parent.state if parent else None)

    @staticmethod
    def annotate(span: Any, name: str | None = None,
                 attributes: Mapping[str, Any] | None = None, error: bool = False) -> None:
        """Rename a span and add attributes (a request's status, a report's outcome)."""
        if span is None:
            return
        if name:
            span.update_name(name)
        if attributes:
            span.set_attributes({key: value for key, value in attributes.items()
                                 if value is not None})
        if error:
            span.set_status(Status(StatusCode.ERROR))

    # ----------------------------------------------------------------- the relay

    def start_publish(self, name: str, parent: TraceContext | None, exchange: str,
                      message_id: str) -> tuple[Any, TraceContext | None]:
        """A producer span for one event about to be published, child of the trace stored
        with it (a new trace when none was): the span, and the context to send along.

        Off: no span, and the stored context goes out as it is.
        """
        if not self.enabled:
            return None, parent
        span = self._tracer.start_span(f"{name} publish", context=self._parent(parent),
                                       kind=SpanKind.PRODUCER, attributes={
                                           "messaging.system": "rabbitmq",
                                           "messaging.operation.type": "publish",
                                           "messaging.destination.name": exchange,
                                           "messaging.rabbitmq.destination.routing_key": name,
                                           "messaging.message.id": message_id})
        return span, self._context_of(span, parent)

    @staticmethod
    def end(span: Any, error: BaseException | str | None = None) -> None:
        """End a span started by :meth:`start_publish`; ``error``: it failed."""
        if span is None:
            return
        if error is not None:
            if isinstance(error, BaseException):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()

    # ----------------------------------------------------------------- the store

    def store(self, store: Any) -> Any:
        """``store`` itself when off; on, a stand-in whose writes are spans."""
        return store if not self.enabled else TracedStore(store, self._tracer, self._system)

    def with_system(self, system: str) -> Tracing:
        """This tracing, naming its store writes' database ``system`` (sqlite, mongodb)."""
        copy = Tracing(self._tracer, self._provider, system)
        copy.enabled = self.enabled
        return copy

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Export what is left and stop the exporter, waiting ``timeout`` seconds at most:
        a collector that is down must not hold a stopping process (the SDK's own flush
        waits for its exporter's retries)."""
        if self._provider is None:
            return
        stopping = threading.Thread(target=self._shutdown_provider, name="tracing-shutdown",
                                    daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("tracing: spans not exported before shutdown were dropped",
                        extra={"waitedSeconds": timeout})

    def _shutdown_provider(self) -> None:
        try:
            self._provider.shutdown()
        except Exception:  # never let tracing fail a shutdown
            log.warning("tracing did not shut down cleanly", exc_info=True)


class TracedStore:
    """A store whose writes made in a trace (a request's, a report's) are client spans of
    it; writes of the background loops (relay, reconciler) and everything else are the
    store's own calls."""

    def __init__(self, store: Any, tracer: Any, system: str) -> None:
        self._store = store
        self._tracer = tracer
        self._system = system
        for name in TRACED_STORE_WRITES:
            setattr(self, name, self._traced(name, getattr(store, name)))

    def _traced(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        tracer, attributes = self._tracer, {"db.system": self._system, "db.operation": name}

        def call(*args: Any, **kwargs: Any) -> Any:
            if not otel_trace.get_current_span().get_span_context().is_valid:
                return method(*args, **kwargs)  # a background loop's: no trace of its own
            with tracer.start_as_current_span(f"store.{name}", kind=SpanKind.CLIENT,
                                              attributes=attributes):
                return method(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @property
    def wrapped(self) -> Any:
        return self._store


def build_tracing(settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing:
    """The process's tracing as the OTEL_* variables ask: off unless OTEL_TRACES_EXPORTER
    names an exporter (``otlp``, ``console``) and OTEL_SDK_DISABLED is not true.

    The SDK reads the rest itself: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, the
    sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG; default parentbased_always_on),
    the batch processor (OTEL_BSP_*) and the exporter's endpoint, headers and timeout
    (OTEL_EXPORTER_OTLP_*). A failing exporter loses spans, never a request: spans are
    exported from a background thread, and a full queue drops them.
    """
    environ = os.environ if environ is None else environ
    exporter_name = settings.otel_traces_exporter
    if settings.otel_sdk_disabled or exporter_name in (None, "none"):
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed "
                    "(pip install 'flow-repository[otel]'): tracing stays off")
        return Tracing()
    exporter = _exporter(exporter_name, settings.otel_exporter_otlp_protocol)
    if exporter is None:
        return Tracing()
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name.
    named = environ.get("OTEL_SERVICE_NAME") or \
        "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    defaults = {} if named else {"service.name": SERVICE_NAME}
    # shut down by the Runtime, within a bound (the SDK's own at-exit hook would wait for a
    # collector that is down)
    provider = TracerProvider(resource=Resource.create(defaults), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on", extra={"exporter": exporter_name,
                                  "protocol": settings.otel_exporter_otlp_protocol})
    return tracing_with(provider)


def tracing_with(provider: Any) -> Tracing:
    """Tracing through ``provider`` (tests hand in one with an in-memory exporter)."""
    return Tracing(provider.get_tracer(INSTRUMENTATION), provider)


def _exporter(name: str, protocol: str) -> Any:
    try:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    except ImportError:
        log.warning("the OTLP exporter is not installed (pip install 'flow-repository[otel]'): "
                    "tracing stays off", extra={"protocol": protocol})
        return None
