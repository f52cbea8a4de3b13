"""GitOps apply: how long `flow-repository apply -f DIR` takes when no flow has changed.

Serves the embedded default (no MONGODB_URL), writes ``--flows`` flow files, applies them
once (creating the flows), then times further applies of the same folder, each as a user
runs it: the installed command in a new process, start-up and file parsing included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import yaml

TARGET_SECONDS = 10.0


def write_files(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        flow = harness.sample_flow(f"bench flow {number}", nodes=3)
        flow["cron"] = "*/5 * * * *"
        flow["flowSettings"] = {"sourceKey": f"bench-{number:04d}", "team": "bench"}
        (folder / f"bench-{number:04d}.yaml").write_text(yaml.safe_dump(flow, sort_keys=False))


def apply(folder: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """One `flow-repository apply` in a new process; (wall seconds, its JSON report)."""
    started = time.perf_counter()
    finished = subprocess.run(
        [str(harness.BIN / "flow-repository"), "apply", "-f", str(folder), "-o", "json"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"apply exited with {finished.returncode}: {finished.stderr[-2000:]}")
    return elapsed, json.loads(finished.stdout)


def run(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    exchange = harness.unique_name("apply-exchange")
    queue = harness.unique_name("apply-queue")
    secret = workdir / "dev-token-secret"
    env = harness.base_env(secret, None, exchange, queue)
    server = harness.product_server(env, harness.free_port(), workdir)
    folder = workdir / "flows"
    write_files(folder, arguments.flows)
    try:
        server.start()
        client_env = {key: value for key, value in os.environ.items()
                      if not key.startswith("FLOW_REPOSITORY_")}
        client_env.update(FLOW_REPOSITORY_URL=server.url,
                          FLOW_REPOSITORY_TOKEN=harness.mint(secret, "bench-user", "bench"))
        creating, report = apply(folder, client_env)
        created = sum(1 for change in report["plan"] if change.get("outcome") == "created")
        print(f"first apply created {created} flows in {creating:.2f}s", flush=True)
        unchanged_runs = []
        for _ in range(arguments.repeat):
            seconds, report = apply(folder, client_env)
            actions = {change["action"] for change in report["plan"]}
            if actions != {"unchanged"} or len(report["plan"]) != arguments.flows:
                raise RuntimeError(f"expected {arguments.flows} unchanged flows, got {actions}")
            unchanged_runs.append(seconds)
        return {
            "benchmark": "bench/apply.py",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "store": harness.describe_store(None, server.workers()),
            "flows": arguments.flows,
            "firstApplyCreatingSeconds": round(creating, 3),
            "unchangedApplySeconds": [round(value, 3) for value in unchanged_runs],
            "unchangedApplyWorstSeconds": round(max(unchanged_runs), 3),
            "targetSeconds": TARGET_SECONDS,
            "met": max(unchanged_runs) < TARGET_SECONDS,
        }
    finally:
        server.stop()
        harness.delete_broker_objects(exchange, [queue, f"{queue}.dead-letter"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=500, help="flow files in the folder")
    parser.add_argument("--repeat", type=int, default=3, help="timed unchanged applies")
    parser.add_argument("--output", default=str(harness.BENCH_DIR / "results" / "apply.json"))
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with the files and server logs")
    arguments = parser.parse_args()
    if arguments.flows < 1 or arguments.repeat < 1:
        parser.error("--flows and --repeat must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="flow-repository-apply-"))
    report = run(arguments, workdir)
    summary = (f"apply of {report['flows']} unchanged flows: "
               f"{', '.join(f'{value:.2f}s' for value in report['unchangedApplySeconds'])} "
               f"(target < {TARGET_SECONDS:.0f}s: {'met' if report['met'] else 'NOT met'})")
    return harness.finish(report, arguments.output, summary, workdir, arguments.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
