"""Dry runs: POST /flows/validate, POST /flows?dryRun=true, PATCH /flows/{id}?dryRun=true."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import ObjectId
from flask.testing import FlaskClient

from flow_repository.adapters.store import FlowStore

Headers = Callable[..., dict[str, str]]
Create = Callable[..., dict[str, Any]]


@pytest.fixture
def writes(store: FlowStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the store's write methods called from now on (a dry run calls none)."""
    called: list[str] = []
    for owner, name in ((store, "insert"), (store, "update"), (store, "drop_pending_history"),
                        (store, "record_history"), (store.history, "record"), (store.history, "trim")):
        original = getattr(owner, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    yield called


def dry_run(response: Any) -> tuple[dict | None, dict]:
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"data", "meta"}
    assert body["meta"]["dryRun"] is True
    return body["data"], body["meta"]


# ----------------------------------------------------------------------------- new flows


@pytest.mark.parametrize("url", ["/flows/validate", "/flows?dryRun=true"])
def test_a_valid_new_flow_is_shown_as_it_would_be_stored_and_nothing_is_written(
    client: FlaskClient, auth: Headers, flow_body, store: FlowStore, writes: list[str],
    url: str,
) -> None:
    flow, meta = dry_run(client.post(url, json=flow_body(), headers=auth()))
    assert meta == {"dryRun": True, "valid": True, "problems": [], "warnings": [],
                    "ignoredFields": []}
    assert flow["status"] == "inactive" and flow["revision"] == 1
    assert flow["owners"] == [{"id": "user-1", "type": "user"},
                              {"id": "tenant-1", "type": "tenant"}]
    assert flow["tenant"] == "tenant-1" and flow["type"] == "ordinary"
    assert {key: flow[key] for key in flow_body()} == flow_body()
    assert writes == []
    assert store.get(ObjectId(flow["id"])) is None
    assert client.get("/flows", headers=auth()).get_json()["meta"]["total"] == 0


@pytest.mark.parametrize("url", ["/flows/validate", "/flows?dryRun=1"])
def test_an_invalid_new_flow_lists_every_problem_with_its_status(
    client: FlaskClient, auth: Headers, flow_body, writes: list[str], url: str
) -> None:
    body = flow_body(nodes=2, cron="every minute")
    body["graph"]["edges"][0]["target"] = "nowhere"
    flow, meta = dry_run(client.post(url, json=body, headers=auth()))
    assert flow is None and meta["valid"] is False
    assert {problem["code"] for problem in meta["problems"]} == {400}
    messages = " | ".join(problem["message"] for problem in meta["problems"])
    assert "cron" in messages and "graph.edges[0].target" in messages
    assert writes == []


def test_a_new_flow_dry_run_needs_the_permission_of_a_create(
    client: FlaskClient, auth: Headers, flow_body, error_messages
) -> None:
    for url in ("/flows/validate", "/flows?dryRun=true"):
        response = client.post(url, json=flow_body(), headers=auth(permissions=("flows.read",)))
        assert error_messages(response, 403) == ["MISSING_PERMISSION"]
        error_messages(client.post(url, json=flow_body()), 401)


def test_dry_run_refuses_arrays_and_values_that_are_not_booleans(
    client: FlaskClient, auth: Headers, flow_body, error_messages, writes: list[str]
) -> None:
    error_messages(client.post("/flows?dryRun=true", json=[flow_body()], headers=auth()), 400)
    error_messages(client.post("/flows?dryRun=maybe", json=flow_body(), headers=auth()), 400)
    created = client.post("/flows?dryRun=false", json=flow_body(), headers=auth())
    assert created.status_code == 201
    assert writes.count("insert") == 1


def test_a_dry_run_names_the_unknown_fields_the_real_call_would_drop(
    client: FlaskClient, auth: Headers, flow_body, create: Create, writes: list[str]
) -> None:
    body = flow_body()
    body["graph"]["nodes"][0]["privileged"] = True
    flow, meta = dry_run(client.post("/flows/validate", json={**body, "color": "red"},
                                     headers=auth()))
    assert meta["ignoredFields"] == ["color", "graph.nodes[0].privileged"]
    assert "color" not in flow and "privileged" not in flow["graph"]["nodes"][0]
    existing = create()
    writes.clear()
    flow, meta = dry_run(client.patch(f"/flows/{existing['id']}?dryRun=true",
                                      json={"name": "x", "color": "red"}, headers=auth()))
    assert meta["ignoredFields"] == ["color"] and meta["valid"] is True
    assert writes == []


# ----------------------------------------------------------------------------- changes


def test_a_patch_dry_run_shows_the_merged_flow_and_changes_nothing(
    client: FlaskClient, auth: Headers, create: Create, store: FlowStore, writes: list[str]
) -> None:
    flow = create()
    before = store.raw(ObjectId(flow["id"]))
    writes.clear()
    flow_after, meta = dry_run(client.patch(f"/flows/{flow['id']}?dryRun=true",
                                            json={"name": "renamed"},
                                            headers={**auth(), "If-Match": '"1"'}))
    assert meta["valid"] is True and meta["problems"] == []
    assert flow_after["name"] == "renamed" and flow_after["revision"] == 2
    assert {k: v for k, v in flow_after.items() if k not in ("name", "revision", "updatedAt")} \
        == {k: v for k, v in flow.items() if k not in ("name", "revision", "updatedAt")}
    assert writes == []
    assert store.raw(ObjectId(flow["id"])) == before  # outbox and history outbox included
    assert client.get(f"/flows/{flow['id']}/revisions", headers=auth()).get_json()[
        "meta"]["total"] == 1


def test_a_patch_dry_run_reports_status_if_match_and_schema_problems_together(
    client: FlaskClient, auth: Headers, create: Create, start_flow, store: FlowStore,
    writes: list[str],
) -> None:
    flow = create()
    start_flow(flow["id"])
    before = store.raw(ObjectId(flow["id"]))
    writes.clear()
    flow_after, meta = dry_run(client.patch(
        f"/flows/{flow['id']}?dryRun=true", json={"name": "x", "cron": "never"},
        headers={**auth(), "If-Match": '"1"'}))
    assert flow_after is None
    assert sorted(problem["code"] for problem in meta["problems"]) == [400, 409, 412]
    assert writes == []
    assert store.raw(ObjectId(flow["id"])) == before


def test_a_patch_dry_run_with_a_valid_body_on_a_running_flow_shows_the_flow_and_the_409(
    client: FlaskClient, auth: Headers, create: Create, start_flow
) -> None:
    flow = create()
    start_flow(flow["id"])
    flow_after, meta = dry_run(client.patch(f"/flows/{flow['id']}?dryRun=true",
                                            json={"name": "x"}, headers=auth()))
    assert flow_after["name"] == "x"
    assert [problem["code"] for problem in meta["problems"]] == [409]
    assert meta["valid"] is False


def test_a_patch_dry_run_has_the_permission_and_visibility_of_a_patch(
    client: FlaskClient, auth: Headers, create: Create, error_messages
) -> None:
    flow = create()
    url = f"/flows/{flow['id']}?dryRun=true"
    error_messages(client.patch(url, json={"name": "x"}, headers=auth("user-2", "tenant-2")),
                   404)
    assert error_messages(client.patch(url, json={"name": "x"},
                                       headers=auth(permissions=("flows.read",))),
                          403) == ["MISSING_PERMISSION"]
    error_messages(client.patch(f"/flows/{'0' * 24}?dryRun=true", json={"name": "x"},
                                headers=auth()), 404)
