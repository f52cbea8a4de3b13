"""The ``flow-repository worker`` process: consumer, relay and reconciler plus a health port."""

from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flow_repository.contract import error_body
from flow_repository.entrypoints.consumer import StatusConsumer
from flow_repository.server.bootstrap import Runtime, WorkerPresence
from flow_repository.server.logs import configure_logging
from flow_repository.settings import MEMORY_DATABASE, Settings

log = logging.getLogger(__name__)


def health_server(runtime: Runtime, port: int) -> ThreadingHTTPServer:
    """/livez (consumer thread alive), /healthcheck (MongoDB + queue), /metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/livez":
                alive = runtime.consumer.alive
                self._send(200 if alive else 503, {"status": "pass" if alive else "fail"})
            elif self.path == "/healthcheck":
                self._send(*runtime.health(queue_required=True))
            elif self.path == "/metrics":
                if runtime.metrics_allowed(self.headers.get("Authorization")):
                    self._send(200, runtime.metrics_text(), runtime.metrics.content_type)
                else:
                    self._send(401, error_body(401, "/metrics needs the metrics token "
                                                    "as a Bearer token."))
            else:
                self._send(404, error_body(404, "Not Found"))

        def _send(self, status: int, body: object, content_type: str = "application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the log

    return ThreadingHTTPServer(("0.0.0.0", port), Handler)


def main(settings: Settings | None = None) -> int:
    """Run until SIGTERM or SIGINT, then finish the message in hand and exit cleanly."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    presence = None
    if settings.embedded and settings.embedded_database == MEMORY_DATABASE:
        log.warning("EMBEDDED_DB_PATH is :memory:: this worker has its own store and cannot "
                    "see the API's flows; use a database file or MONGODB_URL to share one")
    elif settings.embedded:
        log.info(f"MONGODB_URL is not set: sharing the embedded SQLite store in "
                 f"{settings.embedded_database}", extra={"database": settings.embedded_database})
        # while this worker runs, the API processes on the file leave consuming to workers
        presence = WorkerPresence(settings.embedded_database)
    runtime = Runtime.build(settings, relay=True, consumer=StatusConsumer, reconciler=True)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server = health_server(runtime, settings.worker_health_port)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    runtime.start()
    log.info("worker started", extra={"queue": settings.event_queue,
                                      "healthPort": settings.worker_health_port})
    while not stopping.wait(0.5):
        if runtime.consumer.failure is not None:  # logged by the consumer; it names the fix
            break
    log.info("worker stopping")
    runtime.stop()
    if presence is not None:
        presence.close()
    server.shutdown()
    if runtime.consumer.failure is not None:
        log.error("worker stopped: it cannot consume", extra={
            "error": str(runtime.consumer.failure)})
        return 3
    log.info("worker stopped")
    return 0
