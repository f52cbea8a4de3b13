"""Change-feed latency: from an answered PATCH to its event on an open GET /flows/events stream.

Serves ``flow-repository serve`` (embedded SQLite default, or ``--mongodb-url``) with its
default settings (two gunicorn workers: the PATCH and the stream are often served by
different processes), opens one stream, then PATCHes flows one after the other and times,
for each, the moment its event arrives on the stream after the PATCH's answer was read.
The target is a p99 under 200 ms in the embedded default.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import requests

from flow_repository.client.rest import parse_events

TARGET_P99_MS = 200.0


class StreamReader:
    """A thread that records when each (flow id, revision) arrives on the stream."""

    def __init__(self, url: str, token: str) -> None:
        self._response = requests.get(url + "/flows/events", stream=True, timeout=(10, 120),
                                      headers={"Authorization": f"Bearer {token}"})
        self._response.raise_for_status()
        self.arrivals: dict[tuple[str, int], float] = {}
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for change in parse_events(self._response.iter_content(chunk_size=None)):
                if change is None:
                    continue
                arrived = time.perf_counter()
                with self._condition:
                    self.arrivals[(change.flow_id or "", change.revision or 0)] = arrived
                    self._condition.notify_all()
        except (requests.RequestException, AttributeError, OSError):
            pass  # closed by close(): the measurement is over

    def wait_for(self, key: tuple[str, int], timeout: float) -> float | None:
        with self._condition:
            self._condition.wait_for(lambda: key in self.arrivals, timeout)
            return self.arrivals.get(key)

    def close(self) -> None:
        self._response.close()


def run(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = workdir / "dev-secret"
    env = harness.base_env(secret, arguments.mongodb_url, harness.unique_name("exchange"),
                           harness.unique_name("queue"))
    env["WEB_CONCURRENCY"] = str(arguments.workers)
    server = harness.product_server(env, harness.free_port(), workdir).start()
    try:
        token = harness.mint(secret, "bench-user", "bench-tenant")
        client = harness.Client(server.url, token)
        flows = [client.call("POST", "/flows", 201, json=harness.sample_flow(f"watched {i}"))
                 ["data"] for i in range(arguments.flows)]
        revisions = {flow["id"]: flow["revision"] for flow in flows}
        reader = StreamReader(server.url, token)
        latencies: list[float] = []
        early = 0
        missing = 0
        try:
            for number in range(arguments.warmup + arguments.patches):
                flow_id = flows[number % len(flows)]["id"]
                answer = client.call("PATCH", f"/flows/{flow_id}",
                                     json={"name": f"renamed {number}"})
                answered = time.perf_counter()
                revisions[flow_id] = answer["data"]["revision"]
                arrived = reader.wait_for((flow_id, revisions[flow_id]), arguments.timeout)
                if number < arguments.warmup:
                    continue
                if arrived is None:
                    missing += 1
                    continue
                if arrived < answered:
                    early += 1
                latencies.append(max(0.0, arrived - answered) * 1000)
                # random pauses, so that PATCHes do not fall in step with the stream's polls
                time.sleep(random.uniform(0, 2 * arguments.pause_ms) / 1000)
        finally:
            reader.close()
        return {
            "store": harness.describe_store(arguments.mongodb_url, server.memory()),
            "patches": arguments.patches, "flows": arguments.flows,
            "workers": arguments.workers, "pauseMs": arguments.pause_ms,
            "missing": missing, "arrivedBeforeTheAnswer": early,
            "patchToEventMs": {
                "p50": round(harness.percentile(latencies, 0.50), 1),
                "p90": round(harness.percentile(latencies, 0.90), 1),
                "p99": round(harness.percentile(latencies, 0.99), 1),
                "max": round(max(latencies), 1),
                "targetP99": TARGET_P99_MS,
            } if latencies else None,
        }
    finally:
        server.stop()
        harness.delete_broker_objects(env["EVENT_EXCHANGE"], [env["EVENT_QUEUE"]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=500, help="measured PATCHes")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured PATCHes first")
    parser.add_argument("--flows", type=int, default=20, help="flows the PATCHes rotate over")
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY")
    parser.add_argument("--pause-ms", type=float, default=40.0,
                        help="mean of the random pause after each measured PATCH")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each event")
    parser.add_argument("--mongodb-url", default=None,
                        help="a MongoDB to measure instead of the embedded default")
    parser.add_argument("--output", default=str(harness.BENCH_DIR / "results" / "watch.json"))
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with the server logs")
    arguments = parser.parse_args()
    if arguments.patches < 1:
        parser.error("--patches must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="flow-repository-watch-"))
    report = run(arguments, workdir)
    figures = report["patchToEventMs"]
    if figures is None:
        summary = f"no event arrived ({report['missing']} missing)"
    else:
        verdict = "meets" if figures["p99"] < TARGET_P99_MS else "MISSES"
        summary = (f"PATCH answered -> event on the stream, {report['patches']} PATCHes, "
                   f"{report['workers']} gunicorn workers:\n"
                   f"  p50 {figures['p50']} ms  p90 {figures['p90']} ms  "
                   f"p99 {figures['p99']} ms  max {figures['max']} ms  "
                   f"({verdict} the p99 target of {TARGET_P99_MS:g} ms; "
                   f"{report['missing']} missing, {report['arrivedBeforeTheAnswer']} "
                   f"arrived before the answer was read)")
    return harness.finish(report, arguments.output, summary, workdir, arguments.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
