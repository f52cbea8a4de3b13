"""GET /flows/events through the Flask test client: what a caller sees, resuming, the bounds
and every refusal."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flow_repository.adapters.store import Store, utcnow
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings

ALICE = ("alice", "acme")
BOB = ("bob", "globex")


@pytest.fixture
def app(settings: Settings, store: Store) -> Flask:
    """Short heartbeats and streams that end after a second, so reads stop by themselves."""
    return create_app(settings.replace(watch_heartbeat_seconds=0.05, watch_max_seconds=1.0,
                                       max_watchers=3, max_watchers_per_caller=2,
                                       watch_poll_seconds=0.02), store=store)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def parse(text: str) -> list[dict[str, Any]]:
    """The events of a text/event-stream (comments left out)."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            fields["data"] = json.loads(fields["data"])
            found.append(fields)
    return found


def read(response: TestResponse, count: int) -> list[dict[str, Any]]:
    """Read the stream until ``count`` events arrived (or it ended); then close it."""
    text = ""
    try:
        for chunk in response.response:
            text += chunk.decode() if isinstance(chunk, bytes) else chunk
            if len(parse(text)) >= count:
                break
    finally:
        response.close()
    return parse(text)


@pytest.fixture
def watch(client: FlaskClient, auth: Callable[..., dict[str, str]]
          ) -> Callable[..., TestResponse]:
    def open_stream(who: tuple[str, str] = ALICE, query: str = "",
                    headers: dict[str, str] | None = None) -> TestResponse:
        return client.get(f"/flows/events{query}", buffered=False,
                          headers={**auth(*who), **(headers or {})})
    return open_stream


def test_a_stream_shows_its_own_create_and_patch_and_nothing_of_another_tenant(
        watch, client: FlaskClient, auth, flow_body) -> None:
    stream = watch(ALICE)
    assert stream.status_code == 200
    assert stream.mimetype == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-cache"
    theirs = client.post("/flows", json=flow_body(name="theirs"), headers=auth(*BOB))
    ours = client.post("/flows", json=flow_body(name="ours"), headers=auth(*ALICE))
    flow_id = ours.get_json()["data"]["id"]
    client.patch(f"/flows/{theirs.get_json()['data']['id']}", json={"name": "x"},
                 headers=auth(*BOB))
    assert client.patch(f"/flows/{flow_id}", json={"name": "renamed"},
                        headers=auth(*ALICE)).status_code == 200
    events = read(stream, 2)
    assert [(e["event"], e["data"]["id"], e["data"]["revision"], e["data"]["status"],
             e["data"]["change"]) for e in events] == [
        ("created", flow_id, 1, "inactive", "created"),
        ("modified", flow_id, 2, "inactive", "modified")]
    assert int(events[0]["id"]) < int(events[1]["id"])
    assert "flow" not in events[0]["data"]


def test_reconnecting_with_the_first_event_id_resumes_at_the_second(
        watch, client: FlaskClient, auth, flow_body) -> None:
    stream = watch(ALICE)
    flow_id = client.post("/flows", json=flow_body(), headers=auth(*ALICE)).get_json()["data"]["id"]
    client.patch(f"/flows/{flow_id}", json={"name": "second"}, headers=auth(*ALICE))
    first = read(stream, 1)[0]
    resumed = read(watch(ALICE, headers={"Last-Event-ID": first["id"]}), 1)
    assert [(e["data"]["revision"], e["event"]) for e in resumed] == [(2, "modified")]
    by_query = read(watch(ALICE, query=f"?since={first['id']}"), 1)
    assert by_query[0]["id"] == resumed[0]["id"]


def test_status_changes_deletes_and_restores_are_events_with_the_full_flow_on_request(
        watch, client: FlaskClient, auth, flow_body, app: Flask) -> None:
    stream = watch(ALICE, query="?include=flow")
    flow_id = client.post("/flows", json=flow_body(), headers=auth(*ALICE)).get_json()["data"]["id"]
    client.patch(f"/flows/{flow_id}", json={"name": "two"}, headers=auth(*ALICE))
    client.post(f"/flows/{flow_id}/restore", json={"revision": 1}, headers=auth(*ALICE))
    client.post(f"/flows/{flow_id}/start", headers=auth(*ALICE))
    # the orchestrator's report, as the consumer applies it
    app.extensions["flow_repository"].service.apply_status_event("flow.started", {"id": flow_id})
    client.post(f"/flows/{flow_id}/stop", headers=auth(*ALICE))
    events = read(stream, 6)
    assert [e["event"] for e in events] == ["created", "modified", "restored", "status",
                                            "status", "status"]
    assert [e["data"]["status"] for e in events[3:]] == ["starting", "active", "stopping"]
    assert [e["data"]["revision"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0]["data"]["flow"]["id"] == flow_id


def test_a_deleted_flow_is_one_last_event(watch, client: FlaskClient, auth, flow_body) -> None:
    flow_id = client.post("/flows", json=flow_body(), headers=auth(*ALICE)).get_json()["data"]["id"]
    stream = watch(ALICE, query="?include=flow")
    assert client.delete(f"/flows/{flow_id}", headers=auth(*ALICE)).status_code == 200
    [event] = read(stream, 1)
    assert (event["event"], event["data"]["id"], event["data"]["flow"]) == (
        "deleted", flow_id, None)


def test_a_flow_that_stops_being_visible_stops_appearing(
        watch, client: FlaskClient, auth, flow_body) -> None:
    shared = flow_body(owners=[{"id": "bob", "type": "user"}])
    created = client.post("/flows", json=shared, headers=auth("admin", None, ["all"]))
    flow_id = created.get_json()["data"]["id"]
    stream = watch(BOB)
    # the administrator takes bob off the owners, then changes it again
    client.patch(f"/flows/{flow_id}", json={"owners": [{"id": "admin", "type": "user"}]},
                 headers=auth("admin", None, ["all"]))
    client.patch(f"/flows/{flow_id}", json={"name": "hidden"},
                 headers=auth("admin", None, ["all"]))
    assert read(stream, 1) == []


def test_filters_are_those_of_get_flows(watch, client: FlaskClient, auth, flow_body) -> None:
    stream = watch(ALICE, query="?filter[status]=starting")
    flow_id = client.post("/flows", json=flow_body(), headers=auth(*ALICE)).get_json()["data"]["id"]
    client.post(f"/flows/{flow_id}/start", headers=auth(*ALICE))
    assert [e["data"]["status"] for e in read(stream, 1)] == ["starting"]
    assert watch(ALICE, query="?filter[user]=alice&filter[type]=ordinary").status_code == 200


def test_heartbeats_keep_an_idle_stream_alive(watch) -> None:
    stream = watch(ALICE)
    text = "".join(chunk.decode() for chunk in stream.response)
    assert text.startswith("retry: ")
    assert text.count(": keep-alive\n\n") >= 3
    assert text.endswith(": stream time is up; reconnect with Last-Event-ID\n\n")


@pytest.mark.parametrize("position", ["abc", "-1", "1.5", "9" * 30, "٣"])
def test_a_malformed_last_event_id_is_400(watch, error_messages, position: str) -> None:
    [message] = error_messages(watch(ALICE, headers={"Last-Event-ID": position}), 400)
    assert "Last-Event-ID" in message


def test_an_event_id_from_the_future_is_400(watch, error_messages) -> None:
    [message] = error_messages(watch(ALICE, headers={"Last-Event-ID": "999999"}), 400)
    assert "does not exist" in message


def test_an_event_id_no_longer_kept_is_410_telling_to_list_again(
        watch, client: FlaskClient, auth, flow_body, app: Flask, error_messages) -> None:
    for name in ("one", "two"):
        client.post("/flows", json=flow_body(name=name), headers=auth(*ALICE))
    runtime = app.extensions["flow_repository"]
    runtime.store.changes.trim(utcnow() + timedelta(seconds=5))
    [message] = error_messages(watch(ALICE, headers={"Last-Event-ID": "1"}), 410)
    assert "GET /flows" in message
    mark = runtime.store.changes.trimmed_through()
    assert watch(ALICE, headers={"Last-Event-ID": str(mark)}).status_code == 200


def test_no_token_an_expired_token_and_no_read_permission_are_refused(
        client: FlaskClient, token, error_messages) -> None:
    assert error_messages(client.get("/flows/events"), 401) == ["Missing authorization header."]
    expired = token("alice", "acme", ttl=-10)
    error_messages(client.get("/flows/events", headers={"Authorization": f"Bearer {expired}"}),
                   401)
    writer = token("alice", "acme", permissions=["flows.write"])
    assert error_messages(client.get("/flows/events", headers={
        "Authorization": f"Bearer {writer}"}), 403) == ["MISSING_PERMISSION"]


def test_unknown_filters_and_bad_values_are_400(watch, error_messages) -> None:
    [message] = error_messages(watch(ALICE, query="?filter[colour]=red"), 400)
    assert "filter[colour]" in message
    error_messages(watch(ALICE, query="?filter[status]=sleeping"), 400)
    error_messages(watch(ALICE, query="?include=everything"), 400)


def test_streams_beyond_max_watchers_are_429_per_caller_and_503_per_process(
        watch, error_messages, app: Flask) -> None:
    opened = [watch(ALICE), watch(ALICE)]
    response = watch(ALICE)
    error_messages(response, 429)
    assert response.headers["Retry-After"]
    opened.append(watch(BOB))
    response = watch(("carol", "initech"))
    error_messages(response, 503)
    assert response.headers["Retry-After"]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "flow_repository_watch_streams 3.0" in metrics
    for stream in opened:
        stream.close()
    assert app.extensions["flow_repository"].watch.open_streams == 0
    assert "flow_repository_watch_streams 0.0" in app.test_client().get(
        "/metrics").get_data(as_text=True)
    assert watch(ALICE).status_code == 200


def test_a_stream_ends_cleanly_when_the_process_stops(watch, app: Flask) -> None:
    stream = watch(ALICE)
    chunks: Iterator = iter(stream.response)
    next(chunks)
    app.extensions["flow_repository"].watch.shutdown()
    rest = "".join(chunk.decode() for chunk in chunks)
    assert rest.endswith(": the server is stopping; reconnect with Last-Event-ID\n\n")
    assert app.extensions["flow_repository"].watch.open_streams == 0


def test_the_route_is_not_taken_for_a_flow_id(watch, client: FlaskClient, auth,
                                              error_messages) -> None:
    assert watch(ALICE, query="/").status_code == 200  # a trailing slash, as everywhere
    error_messages(client.get("/flows/eventsx", headers=auth(*ALICE)), 400)  # a malformed id
    document = client.get("/openapi.json").get_json()
    answers = document["paths"]["/flows/events"]["get"]["responses"]
    assert "text/event-stream" in answers["200"]["content"]
    assert {"400", "401", "410", "429", "503"} <= set(answers)


def test_head_answers_like_get_without_opening_a_stream(client: FlaskClient, auth,
                                                         app: Flask, error_messages) -> None:
    response = client.head("/flows/events", headers=auth(*ALICE))
    assert (response.status_code, response.mimetype) == (200, "text/event-stream")
    assert app.extensions["flow_repository"].watch.open_streams == 0
    assert client.head("/flows/events").status_code == 401
