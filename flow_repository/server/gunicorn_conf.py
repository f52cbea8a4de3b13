"""Gunicorn settings for the API, read from the same Settings object as the service.

Shipped inside the package so that an installed ``flow-repository serve`` (a container,
a wheel) finds it; deploy/gunicorn.conf.py re-exports it for a plain ``gunicorn -c``.
"""

import os
import tempfile

from flow_repository.server.logs import JsonFormatter
from flow_repository.settings import MEMORY_DATABASE, Settings

_settings = Settings.from_env()

bind = [f"0.0.0.0:{_settings.port}"]
if _settings.health_port:
    # The kubelet's probes get a listener of their own (see gunicorn_worker.py): slow clients
    # filling the API's connection slots cannot make /livez go unanswered.
    bind.append(f"0.0.0.0:{_settings.health_port}")
# The worker is gthread (threads, so pika's connections stay with the one relay thread that
# uses each and nothing is monkey-patched) whose event loop reads every request in full before
# a thread serves it, so slow or idle clients hold no thread; it also answers the errors
# gunicorn raises itself (414, 400, 431, ...) as JSON (flow_repository/server/gunicorn_worker.py).
# An embedded store in memory lives in one process, so it runs exactly one worker; a file
# (the embedded default) is shared by every worker, as a MongoDB is.
worker_class = "flow_repository.server.gunicorn_worker.BufferedThreadWorker"
_in_memory = _settings.embedded and _settings.embedded_database == MEMORY_DATABASE
workers = 1 if _in_memory else _settings.web_concurrency
threads = _settings.gunicorn_threads
worker_connections = _settings.gunicorn_max_connections
timeout = _settings.gunicorn_timeout
graceful_timeout = _settings.gunicorn_graceful_timeout
keepalive = 5
# Several servers may share a host (tests, benchmarks) and pods have a read-only home.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
# Access lines are built by json.dumps (flow_repository/server/access_log.py), not a format string.
logger_class = "flow_repository.server.access_log.JsonAccessLogger"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    # Access lines already are JSON objects, so they are written as they are.
    "formatters": {"json": {"()": JsonFormatter}, "raw": {"format": "%(message)s"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json",
                   "stream": "ext://sys.stderr"},
        "access": {"class": "logging.StreamHandler", "formatter": "raw",
                   "stream": "ext://sys.stdout"},
    },
    "root": {"handlers": ["stderr"], "level": _settings.log_level},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": _settings.log_level,
                           "propagate": False},
        "gunicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def worker_exit(server, worker):
    """Stop the relay (and embedded consumer) of the exiting worker cleanly; an embedded
    consumer's turn passes to another worker."""
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", {})
    if "flow_repository" in extensions:
        extensions["flow_repository"].stop()


def on_starting(server):
    """With several workers, let /metrics add up every worker's counters (before any fork)."""
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="flow-repository-metrics-")


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
