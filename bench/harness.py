"""Shared helpers of the benchmarks: serve under gunicorn, mint tokens, seed flows, clean up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import requests

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's helpers: one copy of each
from support import child_pids, free_port  # noqa: F401 (free_port: for the benches)

BIN = Path(sys.executable).parent
GUNICORN_CONFIG = ROOT / "deploy" / "gunicorn.conf.py"
QUEUE_URL = os.environ.get("QUEUE_URL", "amqp://guest:guest@127.0.0.1:5672")
PERMISSIONS = ("flows.read", "flows.write", "flows.control", "flows.bulk")


def unique_name(kind: str) -> str:
    return f"bench-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def base_env(secret_file: Path, mongodb_url: str | None, exchange: str, queue: str,
             queue_url: str = QUEUE_URL) -> dict:
    """The service environment: dev tokens, quiet logs, the bench's own exchange and queue."""
    env = {key: value for key, value in os.environ.items() if key != "MONGODB_URL"}
    env.update(
        DEV_TOKEN_SECRET_FILE=str(secret_file),
        DEV_TOKENS="allow",  # on a real MongoDB the served API refuses dev tokens otherwise
        LOG_LEVEL="WARNING",
        QUEUE_URL=queue_url,
        EVENT_EXCHANGE=exchange,
        EVENT_QUEUE=queue,
    )
    if mongodb_url:
        env["MONGODB_URL"] = mongodb_url
    else:  # a scratch embedded database beside the secret, never the user's own
        env["EMBEDDED_DB_PATH"] = str(secret_file.parent / "flows.sqlite3")
    return env


def mint(secret_file: Path, sub: str, tenant: str | None,
         permissions: Sequence[str] = PERMISSIONS) -> str:
    """A dev token the served app accepts (same DEV_TOKEN_SECRET_FILE)."""
    from flow_repository.adapters.auth import mint_token
    from flow_repository.settings import Settings

    settings = Settings.from_env({"DEV_TOKEN_SECRET_FILE": str(secret_file)})
    return mint_token(settings, sub, tenant, list(permissions), 6 * 3600)


@dataclass
class Server:
    """A gunicorn master started by the benchmark, with its logs in ``log_dir``."""

    name: str
    command: list[str]
    env: dict
    port: int
    log_dir: Path
    ready_path: str
    process: subprocess.Popen | None = None
    _files: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        stdout = open(self.log_dir / f"{self.name}.access.log", "ab")  # noqa: SIM115
        stderr = open(self.log_dir / f"{self.name}.error.log", "ab")  # noqa: SIM115
        self._files = [stdout, stderr]
        self.process = subprocess.Popen(self.command, env={**self.env, "PORT": str(self.port)},
                                        cwd=ROOT, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   + self.error_tail())
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout}s:\n" + self.error_tail())

    def error_tail(self, lines: int = 30) -> str:
        path = self.log_dir / f"{self.name}.error.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def workers(self) -> list[int]:
        """Pids of the gunicorn worker processes: the children of the master."""
        if self.process is None:
            return []
        return child_pids(self.process.pid)

    def memory(self) -> dict[str, Any]:
        """Peak (VmHWM) and current (VmRSS) resident memory of every worker, in MiB."""
        report = {}
        for pid in self.workers():
            status = proc_status(pid)
            report[str(pid)] = {"peakRssMiB": status.get("VmHWM"), "rssMiB": status.get("VmRSS")}
        return report

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for handle in self._files:
            handle.close()
        self._files = []


def product_server(env: dict, port: int, log_dir: Path, name: str = "flow-repository") -> Server:
    """The service exactly as deployed: ``flow-repository serve`` (deploy/gunicorn.conf.py)."""
    return Server(name, [str(BIN / "flow-repository"), "serve"], env, port, log_dir, "/livez")


def ceiling_server(env: dict, port: int, log_dir: Path) -> Server:
    """bench/ceiling_app.py under the same gunicorn configuration file."""
    command = [str(BIN / "gunicorn"), "--config", str(GUNICORN_CONFIG),
               "--pythonpath", str(BENCH_DIR), "ceiling_app:app"]
    return Server("ceiling", command, env, port, log_dir, "/livez")


def proc_status(pid: int) -> dict[str, float]:
    """The kB-valued lines of /proc/<pid>/status, converted to MiB."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    values[key] = round(int(parts[0]) / 1024, 1)
    except OSError:
        pass
    return values


class Client:
    """A keep-alive HTTP client for one caller of the service."""

    def __init__(self, url: str, token: str, session: requests.Session | None = None) -> None:
        self.url = url
        # Callers may share one session: a connection left idle longer than gunicorn's
        # keepalive (5 s) can be closed just as it is reused, which resets the request.
        self.session = session or requests.Session()
        self.authorization = f"Bearer {token}"

    def call(self, method: str, path: str, expect: int | Sequence[int] = 200, **kwargs) -> Any:
        headers = {**kwargs.pop("headers", {}), "Authorization": self.authorization}
        response = self.session.request(method, self.url + path, headers=headers, timeout=600,
                                        **kwargs)
        allowed = (expect,) if isinstance(expect, int) else tuple(expect)
        if response.status_code not in allowed:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None


def sample_flow(name: str, nodes: int = 2) -> dict:
    """A valid flow body with ``nodes`` chained nodes (the shape the test suite uses)."""
    graph_nodes = [
        {"id": f"step_{i}", "componentId": f"{i + 1:024x}", "function": "process",
         "name": f"Step {i}", "fields": {"key": f"value {i}"}}
        for i in range(nodes)
    ]
    edges = [{"id": f"e{i}", "source": f"step_{i}", "target": f"step_{i + 1}",
              "config": {"mapper": {"out": "$.in"}}} for i in range(nodes - 1)]
    return {"name": name, "description": f"{name} description",
            "graph": {"nodes": graph_nodes, "edges": edges}}


def seed(clients: Sequence[Client], count: int, batch: int = 100, start: int = 0,
         prefix: str = "bench flow") -> dict[int, list[str]]:
    """Create ``count`` flows with bulk POSTs, batch by batch round-robin over ``clients``.

    Returns the created ids per client index.
    """
    created: dict[int, list[str]] = {index: [] for index in range(len(clients))}
    number = start
    batch_index = 0
    while number < start + count:
        size = min(batch, start + count - number)
        owner = batch_index % len(clients)
        bodies = [sample_flow(f"{prefix} {number + i}") for i in range(size)]
        answer = clients[owner].call("POST", "/flows", 201, json=bodies)
        created[owner].extend(item["id"] for item in answer["data"])
        number += size
        batch_index += 1
    return created


def metric(url: str, name: str) -> float | None:
    """One unlabelled sample of the service's Prometheus metrics."""
    text = requests.get(url + "/metrics", timeout=600).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_for_outbox(url: str, timeout: float, poll: float = 1.0) -> tuple[float, float | None]:
    """Wait until the relay has published every stored event; (seconds waited, pending left)."""
    started = time.monotonic()
    pending = metric(url, "flow_repository_outbox_pending_events")
    while pending and time.monotonic() - started < timeout:
        time.sleep(poll)
        pending = metric(url, "flow_repository_outbox_pending_events")
    return time.monotonic() - started, pending


def delete_broker_objects(exchange: str, queues: Sequence[str]) -> None:
    """Remove the benchmark's queues and exchange from RabbitMQ."""
    connection = pika.BlockingConnection(pika.URLParameters(QUEUE_URL))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    finally:
        connection.close()


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def mongodb_database_url(url: str, database: str) -> str:
    """``url`` pointed at ``database`` (query options kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def own_database(url: str | None, prefix: str) -> tuple[str | None, str | None]:
    """A database of this run's own on the MongoDB at ``url``: (its name, the URL naming it);
    (None, None) when no MongoDB is given (the embedded store)."""
    if not url:
        return None, None
    database = unique_name(prefix).replace("-", "_")
    return database, mongodb_database_url(url, database)


def drop_mongodb_database(url: str, database: str) -> None:
    import pymongo

    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(database)
    finally:
        client.close()


def describe_store(mongodb_url: str | None, workers: Mapping[str, Any]) -> str:
    if mongodb_url:
        return (f"MongoDB at MONGODB_URL ({len(workers)} gunicorn worker(s), "
                "WEB_CONCURRENCY)")
    return (f"MONGODB_URL unset: embedded SQLite store in a scratch file ({len(workers)} "
            "gunicorn worker(s), WEB_CONCURRENCY; each relays, one consumes and reconciles)")


def finish(report: Mapping[str, Any], output: str, summary: str, workdir: Path,
           keep_logs: bool) -> int:
    """Write the JSON report, print the summary, remove (or keep) the scratch directory."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nstore: {report['store']}\n")
    print(summary)
    print(f"\nresults written to {path}")
    if keep_logs:
        print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
