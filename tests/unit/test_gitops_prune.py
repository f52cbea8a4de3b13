"""``apply --prune`` deletes only the caller's own flows (as a user), or with --all-visible
what the caller sees after confirmation; it never stops a running flow without --restart."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from flow_repository.client import cli as client_cli
from flow_repository.client.gitops import (
    WHOAMI_FLOW,
    ApplyOptions,
    ManifestError,
    apply_plan,
    make_plan,
)
from flow_repository.client.rest import DryRun, NotFound

ME = [{"id": "me", "type": "user"}, {"id": "acme", "type": "tenant"}]


def flow(flow_id: str, owners: list[dict], key: str | None = "k", status: str = "inactive"
         ) -> dict[str, Any]:
    settings = {"sourceKey": f"{key}-{flow_id}"} if key else {}
    return {"id": flow_id, "name": f"flow {flow_id}", "owners": owners, "status": status,
            "revision": 1, "flowSettings": settings}


class FakeClient:
    """What make_plan and apply_plan call, over a fixed list of stored flows."""

    def __init__(self, flows: list[dict], knows_caller: bool = True) -> None:
        self.flows = flows
        self.knows_caller = knows_caller
        self.calls: list[tuple[str, str]] = []

    def list(self) -> list[dict]:
        return list(self.flows)

    def validate(self, body: dict) -> DryRun:
        if not self.knows_caller:
            raise NotFound(404, ["no such route"])
        return DryRun({**body, "owners": ME})

    def delete(self, flow_id: str, if_match: Any = None) -> None:
        self.calls.append(("delete", flow_id))

    def stop(self, flow_id: str) -> None:
        self.calls.append(("stop", flow_id))


STORED = [
    flow("mine", ME),
    flow("tenant-only", [{"id": "acme", "type": "tenant"}]),  # visible, not mine as a user
    flow("someone-elses", [{"id": "other", "type": "user"}]),  # an admin sees it
    flow("mine-unlabelled", ME, key=None),
    flow("mine-running", ME, status="active"),
]


def deleted(plan: Any) -> list[str]:
    return [change.flow_id for change in plan.changes if change.action == "delete"]


def test_prune_plans_only_flows_the_caller_owns_as_a_user() -> None:
    plan = make_plan(FakeClient(STORED), [], prune=True)
    assert deleted(plan) == ["mine", "mine-running"]
    everything = make_plan(FakeClient(STORED), [], prune=True, prune_all_visible=True)
    assert deleted(everything) == ["mine", "tenant-only", "someone-elses", "mine-running"]


def test_prune_refuses_when_the_service_cannot_say_who_the_caller_is() -> None:
    with pytest.raises(ManifestError, match="--all-visible"):
        make_plan(FakeClient(STORED, knows_caller=False), [], prune=True)


def test_a_running_flow_is_never_stopped_without_restart() -> None:
    client = FakeClient(STORED)
    plan = make_plan(client, [], prune=True)
    apply_plan(client, plan, ApplyOptions(restart=False))
    assert client.calls == [("delete", "mine")]
    outcomes = {change.flow_id: change.outcome for change in plan.changes}
    assert outcomes["mine-running"] == "blocked"


def arguments(folder: Path, *extra: str) -> argparse.Namespace:
    return argparse.Namespace(filename=folder, prune=True, all_visible="--all-visible" in extra,
                              yes="--yes" in extra, dry_run=False, restart=False,
                              wait_timeout=1.0, output="text")


def test_all_visible_asks_first_and_a_script_must_say_yes(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "flows"
    folder.mkdir()
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    client = FakeClient(STORED)
    code = client_cli.apply_files(client, arguments(folder, "--all-visible"))
    assert code == client_cli.USAGE and client.calls == []
    out = capsys.readouterr().out
    assert "someone-elses" in out and "Plan: 0 to create, 0 to update, 4 to delete" in out

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    client_cli.apply_files(client, arguments(folder, "--all-visible"))
    assert ("delete", "someone-elses") in client.calls

    yes = FakeClient(STORED)
    client_cli.apply_files(yes, arguments(folder, "--all-visible", "--yes"))
    assert ("delete", "tenant-only") in yes.calls and ("stop", "mine-running") not in yes.calls


def test_the_service_tells_the_caller_who_they_are_without_storing_anything(
        client: FlaskClient, auth: Callable[..., dict]) -> None:
    answer = client.post("/flows/validate", json=WHOAMI_FLOW, headers=auth("me", "acme"))
    assert answer.status_code == 200, answer.get_json()
    assert {"id": "me", "type": "user"} in answer.get_json()["data"]["owners"]
    assert client.get("/flows", headers=auth("me", "acme")).get_json()["meta"]["total"] == 0
