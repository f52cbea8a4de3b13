"""HTTP throughput, latency and worker memory of the served API, driven by wrk (not a test).

``--tracing on`` serves with tracing on; ``--tracing compare`` measures GET /flows/{id} with
tracing off and on, alternately, on one seeded database (see :func:`bench_tracing`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import harness
import requests

sys.path.insert(0, str(harness.ROOT / "tests"))
from conftest import TcpProxy  # the suite's broker cut-off proxy

DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""

ROTATE_LUA = """
local paths = {%(paths)s}
local headers = {["Authorization"] = "Bearer %(token)s"}
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1], headers)
end
"""

POST_LUA = """
wrk.method = "POST"
wrk.path = "/flows"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
"""


PATCH_LUA = """
local paths = {%(paths)s}
local headers = {["Authorization"] = "Bearer %(token)s",
                 ["Content-Type"] = "application/json"}
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"description": "bench edit ' .. counter .. '"}'
  return wrk.format("PATCH", paths[(counter %% #paths) + 1], headers, body)
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(body + DONE_LUA)
    return path


def rotate_script(directory: Path, name: str, paths: list[str], token: str) -> Path:
    listed = ", ".join(lua_string(path) for path in paths)
    return write_script(directory, name, ROTATE_LUA % {"paths": listed, "token": token})


def run_wrk(wrk: str, url: str, script: Path, seconds: float, arguments: argparse.Namespace
            ) -> dict[str, Any]:
    command = [wrk, f"-t{arguments.threads}", f"-c{arguments.connections}",
               f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(script), url]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in finished.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            raw = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        raise RuntimeError(f"wrk failed ({finished.returncode}):\n{finished.stdout}\n"
                           f"{finished.stderr}")
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw[key] for key in ("connect_errors", "read_errors", "write_errors",
                                      "status_errors", "timeouts"))
    return {
        "requests": raw["requests"],
        "seconds": round(seconds_run, 2),
        "reqPerSec": round(raw["requests"] / seconds_run, 1),
        "p50Ms": round(raw["p50_us"] / 1000, 2),
        "p90Ms": round(raw["p90_us"] / 1000, 2),
        "p99Ms": round(raw["p99_us"] / 1000, 2),
        "maxMs": round(raw["max_us"] / 1000, 2),
        "meanMs": round(raw["mean_us"] / 1000, 2),
        "errors": errors,
        "wrkErrors": {key: raw[key] for key in ("connect_errors", "read_errors",
                                                "write_errors", "status_errors", "timeouts")},
    }


def measure(wrk: str, server: harness.Server, script: Path, arguments: argparse.Namespace,
            label: str, seconds: float | None = None) -> dict[str, Any]:
    """wrk's figures for ``script`` against ``server``, after a warm-up, with the CPU time
    the server's workers spent per request while measured (every thread: the relay's too;
    not wrk's, the broker's or the arbiter's)."""
    warmed = 0
    if arguments.warmup > 0:
        warmed = run_wrk(wrk, server.url, script, arguments.warmup, arguments)["requests"]
    before = cpu_seconds(server)
    result = run_wrk(wrk, server.url, script, arguments.duration if seconds is None else seconds,
                     arguments)
    result["cpuUsPerRequest"] = round((cpu_seconds(server) - before)
                                      / max(1, result["requests"]) * 1e6, 1)
    result["warmupRequests"] = warmed
    print(f"  {label:<44} {result['reqPerSec']:>9.1f} req/s  p50 {result['p50Ms']:>8.2f} ms"
          f"  p99 {result['p99Ms']:>8.2f} ms  CPU {result['cpuUsPerRequest']:>7.1f} us/req"
          f"  errors {result['errors']}", flush=True)
    return result


def average(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several measurements of one endpoint (rates and percentiles alike)."""
    merged = dict(runs[0])
    for key in ("reqPerSec", "p50Ms", "p90Ms", "p99Ms", "meanMs", "cpuUsPerRequest"):
        merged[key] = round(sum(run[key] for run in runs) / len(runs), 2)
    merged["maxMs"] = max(run["maxMs"] for run in runs)
    for key in ("requests", "errors"):
        merged[key] = sum(run[key] for run in runs)
    merged["runs"] = len(runs)
    return merged


def pending(url: str) -> float | None:
    return harness.metric(url, "flow_repository_outbox_pending_events")


ENDPOINTS = {"getFlow": "GET /flows/{id}", "listFlows": "GET /flows (page of 10)",
             "createFlow": "POST /flows"}


def bench_size(size: int, arguments: argparse.Namespace, wrk: str, workdir: Path,
               ceiling: harness.Server) -> dict[str, Any]:
    """Seed ``size`` flows while the broker is cut off (so their creation events pile up),
    measure each endpoint while the relay drains that backlog, then again once it is idle."""
    users = max(1, round(1 / arguments.owned_fraction))
    secret = workdir / "dev-token-secret"
    tokens = [harness.mint(secret, f"bench-user-{i}", f"bench-tenant-{i}") for i in range(users)]
    exchange, queue = harness.unique_name("api-exchange"), harness.unique_name("api-queue")
    database, mongodb_url = harness.own_database(arguments.mongodb_url, f"flows-{size}")
    broker = urlsplit(harness.QUEUE_URL)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    proxy.cut()  # the relay cannot publish while the flows are seeded
    env = harness.base_env(secret, mongodb_url, exchange, queue, proxy.url(harness.QUEUE_URL))
    if arguments.tracing == "on":
        env = tracing_env(env)
    server = harness.product_server(env, harness.free_port(), workdir, f"flow-repository-{size}")
    print(f"\n== {size} stored flows ==", flush=True)
    server.start()
    try:
        session = requests.Session()
        clients = [harness.Client(server.url, token, session) for token in tokens]
        started = time.monotonic()
        created = harness.seed(clients, size, batch=arguments.bulk_size)
        seed_seconds = time.monotonic() - started
        owned = created[0]
        backlog = pending(server.url)
        print(f"  seeded {size} flows ({len(owned)} owned by the caller, {users} owners) "
              f"in {seed_seconds:.1f}s; {backlog or 0:.0f} creation events held back",
              flush=True)

        caller = tokens[0]
        scripts = {
            "getFlow": rotate_script(workdir, f"get-flow-{size}",
                                     [f"/flows/{flow_id}" for flow_id in owned[:200]], caller),
            "listFlows": rotate_script(
                workdir, f"list-flows-{size}",
                [f"/flows?page%5Bsize%5D=10&page%5Bnumber%5D={page}"
                 for page in range(1, max(1, min(10, len(owned) // 10)) + 1)], caller),
            "createFlow": write_script(workdir, f"post-flow-{size}", POST_LUA % {
                "body": lua_string(json.dumps(harness.sample_flow("bench posted flow"))),
                "token": caller}),
            "updateFlow": write_script(workdir, f"patch-flow-{size}", PATCH_LUA % {
                "paths": ", ".join(lua_string(f"/flows/{flow_id}") for flow_id in owned[:200]),
                "token": caller}),
        }
        posted = 0
        draining: dict[str, Any] = {}
        if not arguments.broker_unreachable:
            proxy.restore()
            for key, label in ENDPOINTS.items():
                before = pending(server.url)
                result = measure(wrk, server, scripts[key], arguments,
                                 f"{label}, relay draining", seconds=arguments.drain_duration)
                result["outboxPendingBefore"] = before
                result["outboxPendingAfter"] = pending(server.url)
                draining[key] = result
                if key == "createFlow":
                    posted += result["requests"]
            drain_seconds, left = harness.wait_for_outbox(server.url, arguments.drain_timeout)
            print(f"  outbox: waited {drain_seconds:.1f}s more for the relay, {left or 0:.0f} "
                  "events still pending", flush=True)
        else:
            drain_seconds = 0.0

        idle: dict[str, Any] = {}
        outbox_before = pending(server.url)
        # The ceiling is measured just before and just after the service's GET, and averaged,
        # so that drift on the shared machine hits both sides alike.
        ceiling_runs = [measure(wrk, ceiling, scripts["getFlow"], arguments,
                                "ceiling GET /flows/{id}")]
        idle["getFlow"] = measure(wrk, server, scripts["getFlow"], arguments, ENDPOINTS[
            "getFlow"])
        ceiling_runs.append(measure(wrk, ceiling, scripts["getFlow"], arguments,
                                    "ceiling GET /flows/{id}"))
        ceiling_rate = average(ceiling_runs)
        idle["listFlows"] = measure(wrk, server, scripts["listFlows"], arguments,
                                    ENDPOINTS["listFlows"])
        memory_reads = server.memory()
        idle["createFlow"] = measure(wrk, server, scripts["createFlow"], arguments,
                                     ENDPOINTS["createFlow"])
        idle["updateFlow"] = measure(wrk, server, scripts["updateFlow"], arguments,
                                     LABELS["updateFlow"])
        memory_end = server.memory()
        outbox_after = pending(server.url)
        posted += idle["createFlow"]["requests"] + idle["createFlow"]["warmupRequests"]
        for results in (idle, draining):
            for row in results.values():
                row["ofCeiling"] = round(row["reqPerSec"] / ceiling_rate["reqPerSec"], 3)
                # the share of the ceiling's rate this endpoint could reach at most if both
                # used the same CPUs fully: the ceiling's CPU per request over its own
                row["cpuBoundOfCeiling"] = round(ceiling_rate["cpuUsPerRequest"]
                                                 / row["cpuUsPerRequest"], 3)
        return {
            "storedFlows": size,
            "storedFlowsAtEnd": size + posted,
            "ownedByCaller": len(owned),
            "owners": users,
            "seedSeconds": round(seed_seconds, 1),
            "creationBacklog": backlog,
            "outboxDrainWaitSeconds": round(drain_seconds, 1),
            "outboxPendingBeforeRuns": outbox_before,
            "outboxPendingAfterRuns": outbox_after,
            "ceiling": ceiling_rate,
            "endpoints": idle,
            "whileDraining": draining,
            "ceilingRuns": ceiling_runs,
            "workerMemoryAfterReads": memory_reads,
            "workerMemoryAtEnd": memory_end,
            "ceilingWorkerMemory": ceiling.memory(),
        }
    finally:
        server.stop()
        proxy.close()
        harness.delete_broker_objects(exchange, [queue, f"{queue}.dead-letter"])
        if database:
            harness.drop_mongodb_database(arguments.mongodb_url, database)


def tracing_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with tracing on, as an operator turns it on: the OTLP exporter (HTTP), the
    default sampler (parentbased_always_on: every request without a traceparent starts a
    sampled trace, so every span is exported), and an endpoint where nothing listens: each
    batch export fails (connection refused) and is retried by the SDK's background thread,
    the worst case of a collector that is down."""
    return {**env, "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{harness.free_port()}",
            "OTEL_SERVICE_NAME": "flow-repository-bench"}


def cpu_seconds(server: harness.Server) -> float:
    """User and system CPU time the server's gunicorn workers used so far (every thread)."""
    ticks = 0
    for pid in server.workers():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def bench_tracing(size: int, arguments: argparse.Namespace, wrk: str, workdir: Path
                  ) -> dict[str, Any]:
    """GET /flows/{id} with tracing off and on, on one seeded database.

    The servers run one at a time on the same database, in the order off, on, on, off
    (repeated ``--tracing-rounds`` times) so that drift on a shared machine hits both alike;
    the figures of each mode are averaged and compared: ``slowdown`` is off's rate over
    on's (1.2 at most is the target), ``p50Ratio`` on's median latency over off's, and
    ``cpuRatio`` the CPU time the workers spent per request, on's over off's (steadier
    than the rate when other work shares the machine; wrk's own CPU is not in it).
    """
    secret = workdir / "dev-token-secret"
    token = harness.mint(secret, "bench-user-0", "bench-tenant-0")
    exchange, queue = harness.unique_name("tracing-exchange"), harness.unique_name("tracing-queue")
    database, mongodb_url = harness.own_database(arguments.mongodb_url, f"tracing-{size}")
    env = harness.base_env(secret, mongodb_url, exchange, queue)
    envs = {"off": env, "on": tracing_env(env)}
    print(f"\n== tracing off and on, {size} stored flows ==", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        server = harness.product_server(env, harness.free_port(), workdir, "tracing-seed")
        server.start()
        try:
            client = harness.Client(server.url, token, requests.Session())
            owned = harness.seed([client], size, batch=arguments.bulk_size)[0]
            harness.wait_for_outbox(server.url, arguments.drain_timeout)
        finally:
            server.stop()
        script = rotate_script(workdir, f"tracing-get-{size}",
                               [f"/flows/{flow_id}" for flow_id in owned[:200]], token)
        for round_number in range(arguments.tracing_rounds):
            for mode in ("off", "on", "on", "off"):
                server = harness.product_server(envs[mode], harness.free_port(), workdir,
                                                f"tracing-{mode}")
                server.start()
                try:
                    runs[mode].append(measure(wrk, server, script, arguments,
                                              f"GET /flows/{{id}}, tracing {mode} "
                                              f"(round {round_number + 1})"))
                finally:
                    server.stop()
    finally:
        harness.delete_broker_objects(exchange, [queue, f"{queue}.dead-letter"])
        if database:
            harness.drop_mongodb_database(arguments.mongodb_url, database)
    off, on = average(runs["off"]), average(runs["on"])
    return {
        "storedFlows": size,
        "exporter": "OTLP over HTTP (OTEL_TRACES_EXPORTER=otlp) to a port where nothing "
                    "listens; default sampler (parentbased_always_on)",
        "off": off,
        "on": on,
        "slowdown": round(off["reqPerSec"] / on["reqPerSec"], 3),
        "p50Ratio": round(on["p50Ms"] / off["p50Ms"], 3),
        "p99Ratio": round(on["p99Ms"] / off["p99Ms"], 3),
        "cpuRatio": round(on["cpuUsPerRequest"] / off["cpuUsPerRequest"], 3),
        "runs": runs,
    }


def tracing_table(report: dict[str, Any]) -> str:
    result = report["tracing"]
    title = (f"GET /flows/{{id}}, {result['storedFlows']} stored flows, tracing off vs on "
             f"({result['exporter']})")
    lines = [title, ""]
    for mode in ("off", "on"):
        row = result[mode]
        lines.append(f"  tracing {mode:<4} {row['reqPerSec']:>9.1f} req/s  p50 "
                     f"{row['p50Ms']:>7.2f} ms  p99 {row['p99Ms']:>7.2f} ms  worker CPU "
                     f"{row['cpuUsPerRequest']:>6.1f} us/request  ({row['runs']} runs, "
                     f"{row['errors']} errors)")
    verdict = "within" if result["slowdown"] <= 1.2 else "OUTSIDE"
    cpu_verdict = "within" if result["cpuRatio"] <= 1.2 else "OUTSIDE"
    lines.append(f"\n  slowdown (off rate / on rate): {result['slowdown']:.3f} ({verdict} the "
                 f"1.2x target); p50 on/off {result['p50Ratio']:.3f}, p99 on/off "
                 f"{result['p99Ratio']:.3f}")
    lines.append(f"  worker CPU per request, on/off: {result['cpuRatio']:.3f} ({cpu_verdict} "
                 "the 1.2x target)")
    return "\n".join(lines)


def peak(memory: dict[str, Any], key: str = "peakRssMiB") -> float:
    return max((entry[key] or 0 for entry in memory.values()), default=0.0)


# share of the ceiling, and peak RSS per worker: the embedded store's issue (#17)
TARGETS = {"getFlow": 0.6, "listFlows": 0.35, "createFlow": 0.3}
TARGET_RSS_MIB = 120
LABELS = {"getFlow": "GET /flows/{id}", "listFlows": "GET /flows (page of 10, owner-scoped)",
          "createFlow": "POST /flows",
          "updateFlow": "PATCH /flows/{id} (description, rotating over owned flows)"}


def table(report: dict[str, Any]) -> str:
    lines = [
        ("| stored flows | endpoint | relay | req/s | p50 ms | p99 ms | errors | vs ceiling "
         "| worker CPU us/req | CPU-bound share of ceiling | outbox pending before / after |"),
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        row = run["ceiling"]
        lines.append(f"| {run['storedFlows']} | bare Flask (ceiling) GET /flows/{{id}}, mean of "
                     f"2 runs | idle | {row['reqPerSec']:.0f} | {row['p50Ms']:.2f} | "
                     f"{row['p99Ms']:.2f} | {row['errors']} | 100% | "
                     f"{row['cpuUsPerRequest']:.0f} | 100% | |")
        for phase, results in (("draining", run["whileDraining"]), ("idle", run["endpoints"])):
            for key, row in results.items():
                backlog = ""
                if "outboxPendingBefore" in row:
                    backlog = (f"{row['outboxPendingBefore'] or 0:.0f} / "
                               f"{row['outboxPendingAfter'] or 0:.0f}")
                lines.append(f"| {run['storedFlows']} | {LABELS[key]} | {phase} | "
                             f"{row['reqPerSec']:.0f} | {row['p50Ms']:.2f} | {row['p99Ms']:.2f} | "
                             f"{row['errors']} | {row['ofCeiling']:.0%} | "
                             f"{row['cpuUsPerRequest']:.0f} | {row['cpuBoundOfCeiling']:.0%} | "
                             f"{backlog} |")
    lines += [
        "",
        ("| stored flows | owned by caller | creation backlog drained during the runs "
         "| worker peak RSS (VmHWM) / RSS after the reads, MiB "
         "| flows after POST runs | worker peak RSS at end, MiB | ceiling worker peak, MiB |"),
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for run in report["runs"]:
        reads = run["workerMemoryAfterReads"]
        lines.append(
            f"| {run['storedFlows']} | {run['ownedByCaller']} | {run['creationBacklog'] or 0:.0f} "
            f"| {peak(reads):.1f} / {peak(reads, 'rssMiB'):.1f} | {run['storedFlowsAtEnd']} | "
            f"{peak(run['workerMemoryAtEnd']):.1f} | {peak(run['ceilingWorkerMemory']):.1f} |")
    lines += ["", "| target | stored flows | measured | met |", "|---|---:|---|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['storedFlows']} | {target['measured']} | "
                     f"{'yes' if target['met'] else 'NO'} |")
    return "\n".join(lines)


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for run in runs:
        for phase, results in (("idle", run["endpoints"]), ("relay draining",
                                                             run["whileDraining"])):
            for key, row in results.items():
                if key not in TARGETS:
                    continue
                share = row["ofCeiling"]
                # A draining figure counts only if the backlog lasted the whole measurement.
                drained_early = phase != "idle" and not row.get("outboxPendingAfter")
                checks.append({
                    "target": f"{LABELS[key]} ({phase}) >= {TARGETS[key]:.0%} of ceiling req/s",
                    "storedFlows": run["storedFlows"],
                    "measured": f"{share:.0%}" + (" (backlog ran out)" if drained_early else ""),
                    "met": share >= TARGETS[key] and not drained_early})
        rss = peak(run["workerMemoryAfterReads"])  # at the stated store size (POSTs add flows)
        checks.append({"target": f"<= {TARGET_RSS_MIB} MiB peak RSS per worker",
                       "storedFlows": run["storedFlows"], "measured": f"{rss:.1f} MiB",
                       "met": rss <= TARGET_RSS_MIB})
    return checks


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpuModel": model, "python": platform.python_version(),
            "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unmeasured load before each measurement (0: none)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--sizes", default="1000,10000", help="stored flow counts, comma-separated")
    parser.add_argument("--owned-fraction", type=float, default=0.1,
                        help="share of the stored flows the measured caller owns")
    parser.add_argument("--bulk-size", type=int, default=100,
                        help="flows per seeding POST (at most BULK_MAX_ITEMS)")
    parser.add_argument("--drain-duration", type=float, default=5.0,
                        help="seconds per measurement while the relay drains the creation "
                             "backlog of the seeded flows (after the same warm-up)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the outbox relay to catch up before the "
                             "idle measurements")
    parser.add_argument("--broker-unreachable", action="store_true",
                        help="keep the broker cut off: the relay never publishes, so the API "
                             "is measured without relay work (events stay in the outbox); "
                             "not the production set-up")
    parser.add_argument("--mongodb-url", default=None,
                        help="serve against this MongoDB (WEB_CONCURRENCY workers) instead of "
                             "the embedded SQLite store; a scratch database is used")
    parser.add_argument("--tracing", choices=("off", "on", "compare"), default="off",
                        help="on: serve with tracing on (OTLP to an endpoint where nothing "
                             "listens, default sampler); compare: only GET /flows/{id}, "
                             "tracing off against on, at the first of --sizes")
    parser.add_argument("--tracing-rounds", type=int, default=1,
                        help="with --tracing compare: rounds of off, on, on, off")
    parser.add_argument("--output", default=None,
                        help="the JSON report (default bench/results/api.json, or "
                             "api-tracing.json with --tracing compare)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with server logs and wrk scripts")
    arguments = parser.parse_args()
    if not 0 < arguments.owned_fraction <= 1:
        parser.error("--owned-fraction must be in (0, 1]")
    sizes = [int(size) for size in arguments.sizes.split(",") if size.strip()]
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu) or "
              "brew install wrk (macOS)", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="flow-repository-bench-"))
    results = harness.BENCH_DIR / "results"
    if arguments.tracing == "compare":
        output = arguments.output or str(results / "api-tracing.json")
        print(f"wrk: {arguments.threads} threads, {arguments.connections} connections, "
              f"{arguments.duration:g}s per measurement (+{arguments.warmup:g}s warm-up); "
              f"logs in {workdir}", flush=True)
        report = {"benchmark": "bench/api.py --tracing compare",
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "store": harness.describe_store(arguments.mongodb_url, {"?": None}),
                  "machine": machine(),
                  "wrk": {"threads": arguments.threads, "connections": arguments.connections,
                          "durationSeconds": arguments.duration,
                          "warmupSeconds": arguments.warmup},
                  "tracing": bench_tracing(sizes[0], arguments, wrk, workdir)}
        return harness.finish(report, output, tracing_table(report), workdir,
                              arguments.keep_logs)
    output = arguments.output or str(results / "api.json")
    store_note = harness.describe_store(arguments.mongodb_url, {"?": None})
    print(f"store: {store_note}\nwrk: {arguments.threads} threads, {arguments.connections} "
          f"connections, {arguments.duration:g}s per measurement (+{arguments.warmup:g}s "
          f"warm-up); logs in {workdir}", flush=True)
    exchange, queue = harness.unique_name("ceiling-exchange"), harness.unique_name("ceiling-queue")
    ceiling_env = harness.base_env(workdir / "dev-token-secret", arguments.mongodb_url,
                                   exchange, queue)
    ceiling = harness.ceiling_server(ceiling_env, harness.free_port(), workdir).start()
    runs = []
    try:
        for size in sizes:
            runs.append(bench_size(size, arguments, wrk, workdir, ceiling))
    finally:
        ceiling.stop()
    workers = runs[0]["workerMemoryAtEnd"] if runs else {}
    report = {
        "benchmark": "bench/api.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store": harness.describe_store(arguments.mongodb_url, workers),
        "embedded": not arguments.mongodb_url,
        "brokerUnreachable": arguments.broker_unreachable,
        "tracing": arguments.tracing,
        "machine": machine(),
        "wrk": {"threads": arguments.threads, "connections": arguments.connections,
                "durationSeconds": arguments.duration, "warmupSeconds": arguments.warmup},
        "ownedFraction": arguments.owned_fraction,
        "runs": runs,
    }
    report["targets"] = targets(runs)
    summary = table(report)
    if arguments.broker_unreachable:
        summary = ("broker: UNREACHABLE on purpose (--broker-unreachable): relay idle, "
                   f"events held\n\n{summary}")
    return harness.finish(report, output, summary, workdir, arguments.keep_logs)

if __name__ == "__main__":
    sys.exit(main())
