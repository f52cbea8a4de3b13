"""`flow-repository apply`, `export` and `flows ...` against a served process."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from flow_repository.adapters.store import FlowStore
from flow_repository.client.gitops import (
    ApplyOptions,
    apply_plan,
    editable,
    load_manifests,
    make_plan,
)
from flow_repository.client.rest import FlowRepositoryClient
from flow_repository.entrypoints.cli import main
from support import ALL_PERMISSIONS, EXECUTABLE, Bus, Served, base_env

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

OK, NOT_FOUND, CONFLICT, INVALID, REFUSED, UNAVAILABLE = 0, 3, 4, 5, 6, 7


class Cli:
    """Runs the ``flow-repository`` client commands in-process against one served API."""

    def __init__(self, api: Served, token: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.api, self.token, self._capsys = api, token, capsys
        self.client = FlowRepositoryClient(api.base_url, token)

    def __call__(self, *arguments: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        command, rest = list(arguments[:1]), list(arguments[1:])
        if command == ["flows"]:
            command, rest = [*command, rest[0]], rest[1:]
        code = main([*command, "--url", self.api.base_url, "--token", self.token, *rest])
        captured = self._capsys.readouterr()
        return code, captured.out, captured.err

    def apply(self, path: Path, *options: str) -> tuple[int, dict[str, Any], str]:
        code, out, err = self("apply", "-f", str(path), "-o", "json", *options)
        return code, json.loads(out) if out.strip() else {}, err

    def flows(self) -> list[dict[str, Any]]:
        return list(self.client.list())


@pytest.fixture
def cli(api: Served, iam: FakeIam, capsys) -> Cli:
    return Cli(api, iam.grant("gitops", "acme"), capsys)


def write(path: Path, document: Any, fmt: str = "yaml") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document) if fmt == "json" else yaml.safe_dump(document)
    path.write_text(text)
    return path


def keyed(flow_body, key: str, **extra: Any) -> dict[str, Any]:
    return flow_body(f"Flow {key}", flowSettings={"sourceKey": key, "team": "data"}, **extra)


def actions(report: dict[str, Any]) -> dict[str, str]:
    return {change["key"]: change["action"] for change in report["plan"]}


def test_apply_creates_then_a_second_apply_changes_nothing(cli: Cli, tmp_path: Path,
                                                           flow_body) -> None:
    folder = tmp_path / "flows"
    write(folder / "crm.yaml", keyed(flow_body, "crm", cron="*/5 * * * *"))
    write(folder / "erp.json", keyed(flow_body, "erp"), "json")
    write(folder / "nested" / "hr.yml", keyed(flow_body, "hr", nodes=3))
    (folder / "README.md").write_text("not a flow")
    write(folder / ".hidden" / "skip.yaml", {"not": "read"})

    code, report, _ = cli.apply(folder)
    assert code == OK, report
    assert actions(report) == {"crm": "create", "erp": "create", "hr": "create"}
    assert {change["outcome"] for change in report["plan"]} == {"created"}
    stored = {flow["flowSettings"]["sourceKey"]: flow for flow in cli.flows()}
    assert set(stored) == {"crm", "erp", "hr"}
    assert stored["crm"]["cron"] == "*/5 * * * *"
    assert stored["hr"]["flowSettings"] == {"sourceKey": "hr", "team": "data"}
    assert len(stored["hr"]["graph"]["nodes"]) == 3

    code, report, _ = cli.apply(folder)
    assert code == OK
    assert actions(report) == {"crm": "unchanged", "erp": "unchanged", "hr": "unchanged"}
    after = {flow["flowSettings"]["sourceKey"]: flow for flow in cli.flows()}
    assert {key: flow["revision"] for key, flow in after.items()} == {
        key: flow["revision"] for key, flow in stored.items()}

    code, out, _ = cli("apply", "-f", str(folder))
    assert code == OK
    assert "Plan: 0 to create, 0 to update, 0 to delete, 3 unchanged." in out


def test_dry_run_shows_the_diff_and_apply_updates_with_if_match(cli: Cli, tmp_path: Path,
                                                                flow_body) -> None:
    path = write(tmp_path / "crm.yaml", keyed(flow_body, "crm"))
    assert cli.apply(path)[0] == OK
    (before,) = cli.flows()

    document = yaml.safe_load(path.read_text())
    document["name"] = "CRM, hourly"
    document["graph"]["nodes"][1]["fields"] = {"key": "changed"}
    write(path, document)
    code, out, _ = cli("apply", "-f", str(path), "--dry-run")
    assert code == OK
    assert f"~ update    {before['id']}" in out
    assert '      replace /name "CRM, hourly"' in out
    assert "/graph/nodes/1/fields/key" in out
    assert cli.flows() == [before], "a dry run changes nothing"

    code, report, _ = cli.apply(path)
    assert code == OK
    (change,) = report["plan"]
    assert (change["action"], change["outcome"], change["id"]) == ("update", "updated",
                                                                   before["id"])
    (after,) = cli.flows()
    assert after["name"] == "CRM, hourly"
    assert after["graph"]["nodes"][1]["fields"] == {"key": "changed"}
    assert after["revision"] == before["revision"] + 1
    assert cli.apply(path)[1]["plan"][0]["action"] == "unchanged"


def test_a_file_with_an_id_matches_by_id_even_without_a_key(cli: Cli, tmp_path: Path,
                                                            flow_body) -> None:
    stored = cli.client.create(flow_body("made by hand")).flow
    document = {"id": stored["id"], **editable(stored), "name": "now in git"}
    code, report, _ = cli.apply(write(tmp_path / "hand.yaml", document))
    assert code == OK
    assert report["plan"][0]["action"] == "update" and report["plan"][0]["id"] == stored["id"]
    (after,) = cli.flows()
    assert after["name"] == "now in git"
    assert "sourceKey" not in (after.get("flowSettings") or {}), "a stored id needs no label"


def test_prune_deletes_only_labelled_flows_that_lost_their_file(cli: Cli, tmp_path: Path,
                                                                flow_body) -> None:
    folder = tmp_path / "flows"
    write(folder / "keep.yaml", keyed(flow_body, "keep"))
    gone = write(folder / "gone.yaml", keyed(flow_body, "gone"))
    assert cli.apply(folder)[0] == OK
    unmanaged = cli.client.create(flow_body("not from git")).flow
    gone.unlink()

    code, report, _ = cli.apply(folder)
    assert actions(report) == {"keep": "unchanged"}, "no --prune, no delete"
    code, report, _ = cli.apply(folder, "--prune", "--dry-run")
    assert actions(report) == {"keep": "unchanged", "gone": "delete"}
    assert len(cli.flows()) == 3
    code, report, _ = cli.apply(folder, "--prune")
    assert code == OK
    assert [c["outcome"] for c in report["plan"] if c["action"] == "delete"] == ["deleted"]
    names = sorted(flow["name"] for flow in cli.flows())
    assert names == sorted(["Flow keep", unmanaged["name"]])


def test_a_flow_changed_since_the_plan_is_a_conflict_not_overwritten(
        cli: Cli, iam: FakeIam, tmp_path: Path, flow_body) -> None:
    folder = tmp_path / "flows"
    write(folder / "a.yaml", keyed(flow_body, "a"))
    write(folder / "b.yaml", keyed(flow_body, "b"))
    assert cli.apply(folder)[0] == OK
    for key in ("a", "b"):
        document = yaml.safe_load((folder / f"{key}.yaml").read_text())
        write(folder / f"{key}.yaml", {**document, "description": "from git"})

    plan = make_plan(cli.client, load_manifests(folder))
    assert [change.action for change in plan.changes] == ["update", "update"]
    # Someone else edits flow "a" between the plan and the apply.
    colleague = FlowRepositoryClient(cli.api.base_url, iam.grant("colleague", "acme"))
    a_id = plan.changes[0].flow_id
    colleague.update(a_id, {"description": "by a colleague"})
    apply_plan(cli.client, plan, ApplyOptions())
    assert [change.outcome for change in plan.changes] == ["conflict", "updated"]
    assert "changed since the plan" in plan.changes[0].message
    assert cli.client.get(a_id).flow["description"] == "by a colleague"

    assert cli.apply(folder)[0] == OK  # a fresh plan sees the colleague's change
    assert cli.client.get(a_id).flow["description"] == "from git"


def test_malformed_files_stop_the_apply_before_anything_changes(cli: Cli, tmp_path: Path,
                                                                flow_body) -> None:
    folder = tmp_path / "flows"
    write(folder / "good.yaml", keyed(flow_body, "good"))
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    (folder / "broken.json").write_text('{"name": ')
    write(folder / "nokey.yaml", flow_body("no key"))
    write(folder / "list.yaml", [keyed(flow_body, "x")])
    write(folder / "twin.yaml", keyed(flow_body, "good"))
    (folder / "python.yaml").write_text("!!python/object/apply:os.system ['true']\n")

    code, out, err = cli("apply", "-f", str(folder))
    assert code == INVALID
    for name in ("broken.yaml", "broken.json", "nokey.yaml", "list.yaml", "twin.yaml",
                 "python.yaml"):
        assert name in err, name
    assert "needs an id or a flowSettings.sourceKey" in err
    assert out == ""
    assert cli.flows() == []

    code, out, err = cli("apply", "-f", str(tmp_path / "missing"))
    assert code == INVALID and "no such file or folder" in err


def test_a_flow_the_service_refuses_is_invalid(cli: Cli, tmp_path: Path, flow_body) -> None:
    body = keyed(flow_body, "bad")
    body["graph"]["edges"][0]["target"] = "nowhere"
    write(tmp_path / "flows" / "bad.yaml", body)
    write(tmp_path / "flows" / "fine.yaml", keyed(flow_body, "fine"))
    code, report, _ = cli.apply(tmp_path / "flows")
    assert code == INVALID
    outcomes = {change["key"]: change.get("outcome") for change in report["plan"]}
    # Without the service's dry run the refusal comes at apply time; with it, in the plan.
    assert outcomes["bad"] in ("invalid", None)
    bad = next(change for change in report["plan"] if change["key"] == "bad")
    assert any("nowhere" in problem for problem in bad["problems"])


def test_running_flow_is_reported_then_restarted_with_restart(cli: Cli, bus: Bus, listener,
                                                              tmp_path: Path,
                                                              flow_body) -> None:
    events = listener()
    path = write(tmp_path / "live.yaml", keyed(flow_body, "live"))
    assert cli.apply(path)[0] == OK
    (flow,) = cli.flows()
    cli.client.start(flow["id"])
    events.wait("flow.starting", flow["id"])
    bus.publish("flow.started", flow["id"])
    cli.client.wait_for_status(flow["id"], "active", 15)
    write(path, {**yaml.safe_load(path.read_text()), "name": "live, changed"})

    code, out, _ = cli("apply", "-f", str(path))
    assert code == CONFLICT
    assert "the flow is active: it must be stopped to change (--restart does it)" in out
    assert "blocked:" in out
    assert cli.client.get(flow["id"]).flow["name"] == "Flow live"

    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(
        zip(("code", "report", "err"), cli.apply(path, "--restart", "--wait-timeout", "30"))))
    runner.start()
    events.wait("flow.stopping", flow["id"])
    bus.publish("flow.stopped", flow["id"])
    runner.join(60)
    assert result["code"] == OK, result
    (change,) = result["report"]["plan"]
    assert (change["outcome"], change["message"]) == ("updated",
                                                      "stopped, changed and started again")
    after = cli.client.get(flow["id"]).flow
    assert (after["name"], after["status"]) == ("live, changed", "starting")


def test_export_then_apply_to_an_empty_repository_reproduces_the_flows(
        cli: Cli, serve, iam: FakeIam, tmp_path: Path, flow_body, capsys, settings,
        request) -> None:
    # Only an administrator may make another user an owner (README, Ownership rule), so a
    # migration that keeps owners runs as one.
    admin = Cli(cli.api, iam.grant("gitops", "acme", [*ALL_PERMISSIONS, "all"]), capsys)
    originals = [
        admin.client.create(flow_body("plain")).flow,
        admin.client.create(flow_body("scheduled", nodes=3, cron="0 * * * *",
                                      fromTemplate="0123456789abcdef01234567")).flow,
        admin.client.create(keyed(flow_body, "labelled", type="realtime")).flow,
        admin.client.create(flow_body("shared", owners=[{"id": "ops", "type": "user"}])).flow,
    ]
    code, out, _ = cli("export", "-o", str(tmp_path / "export"))
    assert code == OK and "exported 4 flows" in out
    files = sorted(path.name for path in (tmp_path / "export").iterdir())
    assert files == sorted([*(f"{flow['id']}.yaml" for flow in originals[:2]),
                            "labelled.yaml", f"{originals[3]['id']}.yaml"])

    # served processes share the test's database: the copy gets a database of its own
    elsewhere = {"EMBEDDED_DB_PATH": str(tmp_path / "empty.sqlite3")}
    if settings.mongodb_url:
        url = urlunsplit(urlsplit(settings.mongodb_url)._replace(
            path=urlsplit(settings.mongodb_url).path + "_empty"))
        elsewhere["MONGODB_URL"] = url
        request.addfinalizer(
            lambda: FlowStore.from_settings(settings.replace(mongodb_url=url)).drop_all())
    empty = Cli(serve(**elsewhere), admin.token, capsys)
    code, report, _ = empty.apply(tmp_path / "export")
    assert code == OK, report
    assert [change["action"] for change in report["plan"]] == ["create"] * 4
    copies = {flow["name"]: flow for flow in empty.flows()}
    for original in originals:
        copy = copies[original["name"]]
        label = (original.get("flowSettings") or {}).get("sourceKey", original["id"])
        expected = editable(original)
        expected["flowSettings"] = {**(original.get("flowSettings") or {}), "sourceKey": label}
        assert editable(copy) == expected, original["name"]

    code, report, _ = empty.apply(tmp_path / "export")  # matched by sourceKey = old id
    assert code == OK
    assert [change["action"] for change in report["plan"]] == ["unchanged"] * 4
    code, report, _ = cli.apply(tmp_path / "export")  # matched by id at the origin
    assert [change["action"] for change in report["plan"]] == ["unchanged"] * 4


def test_flows_commands(cli: Cli, bus: Bus, listener, flow_body) -> None:
    events = listener()
    first = cli.client.create(flow_body("alpha")).flow
    cli.client.create(flow_body("beta"))
    code, out, _ = cli("flows", "list")
    lines = out.splitlines()
    assert code == OK and lines[0].split() == ["ID", "STATUS", "REVISION", "UPDATED", "NAME"]
    assert [line.split()[-1] for line in lines[1:]] == ["alpha", "beta"]
    code, out, _ = cli("flows", "list", "-o", "json", "--search", "bet")
    assert [flow["name"] for flow in json.loads(out)] == ["beta"]
    code, out, _ = cli("flows", "get", first["id"], "-o", "yaml")
    assert yaml.safe_load(out)["name"] == "alpha"
    assert json.loads(cli("flows", "get", first["id"])[1])["id"] == first["id"]
    assert cli("flows", "get", "0123456789abcdef01234567")[0] == NOT_FOUND

    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(
        zip(("code", "out", "err"), cli("flows", "start", first["id"], "--wait",
                                        "--wait-timeout", "30"))))
    runner.start()
    events.wait("flow.starting", first["id"])
    bus.publish("flow.started", first["id"])
    runner.join(60)
    assert (result["code"], result["out"]) == (OK, f"{first['id']} active\n")
    assert result["err"] == "", "no progress line when stderr is not a terminal"
    code, _, err = cli("flows", "delete", first["id"])
    assert code == CONFLICT and "active" in err
    assert cli("flows", "stop", first["id"])[1] == f"{first['id']} stopping\n"
    bus.publish("flow.stopped", first["id"])
    cli.client.wait_for_status(first["id"], "inactive", 15)
    code, _, err = cli("flows", "delete", first["id"], "--if-match", "1")
    assert code == CONFLICT and "revision" in err.lower()
    revision = cli.client.get(first["id"]).revision
    assert cli("flows", "delete", first["id"], "--if-match", str(revision))[0] == OK


def test_flows_history_and_diff(cli: Cli, flow_body) -> None:
    """Needs the history routes (issue 10)."""
    created = cli.client.create(flow_body("v1"))
    cli.client.update(created.flow["id"], {"name": "v2"}, if_match=created.revision)
    code, out, _ = cli("flows", "history", created.flow["id"])
    assert code == OK
    assert [line.split()[0] for line in out.splitlines()] == ["REVISION", "2", "1"]
    code, out, _ = cli("flows", "diff", created.flow["id"], "--from", "1")
    assert {"op": "replace", "path": "/name", "value": "v2"} in json.loads(out)


def test_apply_stops_when_iam_is_down(cli: Cli, iam: FakeIam, tmp_path: Path,
                                      flow_body) -> None:
    write(tmp_path / "flows" / "a.yaml", keyed(flow_body, "a"))
    fresh = Cli(cli.api, iam.grant("gitops", "acme"), cli._capsys)
    iam.mode = "down"
    code, _, err = fresh("apply", "-f", str(tmp_path / "flows"), "--retries", "1")
    assert code == UNAVAILABLE
    assert "Identity service is unavailable" in err
    iam.mode = "up"
    assert cli.flows() == []


def run_executable(arguments: list[str], env: dict[str, str],
                   stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXECUTABLE), *arguments], env=env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=120, check=False)


def test_the_installed_command_reads_its_environment_and_shows_progress_on_a_terminal(
        api: Served, iam: FakeIam, tmp_path: Path, flow_body) -> None:
    folder = tmp_path / "flows"
    for key in ("one", "two"):
        write(folder / f"{key}.yaml", keyed(flow_body, key))
    env = {**base_env(tmp_path / "home"), "FLOW_REPOSITORY_URL": api.base_url,
           "FLOW_REPOSITORY_TOKEN": iam.grant("gitops", "acme")}

    quiet = run_executable(["apply", "-f", str(folder)], env)
    assert quiet.returncode == OK, quiet.stderr
    assert quiet.stderr == "", "quiet when stderr is not a terminal"
    assert "Applied: 2 of 2 changes." in quiet.stdout

    write(folder / "three.yaml", keyed(flow_body, "three"))
    controller, terminal = pty.openpty()
    try:
        shown = run_executable(["apply", "-f", str(folder)], env, stderr=terminal)
        os.close(terminal)
        terminal = -1
        progress = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            progress += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert shown.returncode == OK
    assert b"applying 1/1: create Flow three" in progress

    refused = run_executable(["flows", "list"], {**env, "FLOW_REPOSITORY_TOKEN": "wrong"})
    assert refused.returncode == REFUSED
    assert refused.stderr.startswith("flow-repository: ")
    unreachable = run_executable(["flows", "list", "--url", "http://127.0.0.1:9"], env)
    assert unreachable.returncode == UNAVAILABLE
    usage = run_executable(["apply"], env)
    assert usage.returncode == 2 and "-f/--filename" in usage.stderr
    helped = run_executable(["--help"], env)
    assert "exit codes:" in helped.stdout and "7  the service" in helped.stdout


def test_help_lists_the_exit_codes_for_every_client_command(capsys) -> None:
    for command in (["apply"], ["export"], ["flows", "list"], ["flows", "start"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        help_text = capsys.readouterr().out
        assert "exit codes:" in help_text and "4  conflict" in help_text, command



def test_a_reader_can_plan_but_not_apply(cli: Cli, iam: FakeIam, tmp_path: Path,
                                         flow_body) -> None:
    folder = tmp_path / "flows"
    write(folder / "a.yaml", keyed(flow_body, "a"))
    write(folder / "b.yaml", keyed(flow_body, "b"))
    reader = Cli(cli.api, iam.grant("gitops", "acme", permissions=["flows.read"]), cli._capsys)
    code, report, _ = reader.apply(folder, "--dry-run")
    assert code == OK
    assert actions(report) == {"a": "create", "b": "create"}
    code, report, _ = reader.apply(folder)
    assert code == REFUSED
    assert report["plan"][0]["message"] == "MISSING_PERMISSION"
    assert [change["outcome"] for change in report["plan"]] == ["failed", "skipped"]
    assert cli.flows() == []
