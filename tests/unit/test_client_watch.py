"""FlowRepositoryClient.watch and wait_for_status against the real app (through a session
that hands requests to the Flask test client), and the polling fallback."""

from __future__ import annotations

import json as jsonlib
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from flow_repository.adapters.store import Store
from flow_repository.client.rest import (
    FlowRepositoryClient,
    Gone,
    StatusTimeout,
    Unauthorized,
    WatchNotSupported,
    parse_events,
)
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings


class Raw:
    """Stands in for urllib3's response: streams the app's chunks as they come."""

    def __init__(self, chunks: Iterator[bytes], closing: Any) -> None:
        self._chunks = chunks
        self._closing = closing

    def stream(self, _size: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        for chunk in self._chunks:
            yield chunk if isinstance(chunk, bytes) else chunk.encode()

    def close(self) -> None:
        self._closing()

    def release_conn(self) -> None:
        pass


class AppSession(requests.Session):
    """A requests session whose requests the Flask app answers (streams stay streams)."""

    def __init__(self, client: FlaskClient, refused: dict[str, int] | None = None) -> None:
        super().__init__()
        self.client = client
        self.refused = refused or {}  # path -> the status it answers instead
        self.paths: list[str] = []

    def request(self, method: str, url: str, params: Any = None, json: Any = None,
                headers: Any = None, stream: bool = False, **_: Any
                ) -> requests.Response:  # type: ignore[override]
        path = "/" + url.split("/", 3)[3]
        self.paths.append(path)
        response = requests.Response()
        response.url = url
        if path in self.refused:
            status = self.refused[path]
            response.status_code = status
            response._content = jsonlib.dumps({"errors": [{"message": "no", "code": status}]}
                                           ).encode()
            response._content_consumed = True
            return response
        query = f"?{urlencode(params)}" if params else ""
        answer = self.client.open(path + query, method=method, json=json,
                                  headers=dict(headers or {}), buffered=not stream)
        response.status_code = answer.status_code
        response.headers.update(dict(answer.headers))
        if stream and answer.status_code < 300:
            response.raw = Raw(iter(answer.response), answer.close)
        else:
            response._content = answer.get_data()
            response._content_consumed = True
        return response


@pytest.fixture
def app(settings: Settings, store: Store) -> Flask:
    return create_app(settings.replace(watch_heartbeat_seconds=0.05, watch_max_seconds=0.5,
                                       watch_poll_seconds=0.02), store=store)


@pytest.fixture
def session(app: Flask) -> AppSession:
    return AppSession(app.test_client())


@pytest.fixture
def alice(session: AppSession, token) -> FlowRepositoryClient:
    return FlowRepositoryClient("http://flows.test", token("alice", "acme"), session=session,
                                backoff=0.0, max_backoff=0.0)


def test_events_are_parsed_across_chunk_boundaries() -> None:
    stream = [b"retry: 2000\n: hello\n\n", b"id: 7\nevent: modi", b"fied\ndata: {\"id\":",
              b" \"f\", \"status\": \"inactive\"}\n\n: keep-alive\n\n"]
    parsed = list(parse_events(stream))
    assert parsed[0] is None and parsed[2] is None
    assert (parsed[1].id, parsed[1].event, parsed[1].flow_id, parsed[1].status) == (
        "7", "modified", "f", "inactive")


def test_watch_yields_changes_and_reconnects_with_the_last_event_id(
        alice: FlowRepositoryClient, session: AppSession, flow_body) -> None:
    flow = alice.create(flow_body()).flow

    def edit() -> None:
        alice.update(flow["id"], {"name": "two"})
        threading.Event().wait(1.2)  # streams end every 0.5 s here: the client reconnects
        alice.update(flow["id"], {"name": "three"})

    changes = alice.watch(timeout=10)
    editor = threading.Timer(0.2, edit)
    editor.start()
    seen = [next(changes), next(changes)]
    changes.close()
    editor.join()
    assert [(c.event, c.revision) for c in seen] == [("modified", 2), ("modified", 3)]
    opened = [path for path in session.paths if path.startswith("/flows/events")]
    assert len(opened) >= 3


def test_watch_resumes_from_an_event_id(alice: FlowRepositoryClient, flow_body) -> None:
    def edit() -> None:
        flow = alice.create(flow_body()).flow
        alice.update(flow["id"], {"name": "two"})

    before = alice.watch(timeout=10)  # the stream opens at the first next()
    editor = threading.Timer(0.2, edit)
    editor.start()
    first = next(before)
    editor.join()
    before.close()
    resumed = alice.watch(last_event_id=first.id, timeout=10)
    second = next(resumed)
    resumed.close()
    assert (first.event, second.event, second.revision) == ("created", "modified", 2)
    assert int(second.id) > int(first.id)


def test_wait_for_status_follows_the_change_feed(alice: FlowRepositoryClient, session,
                                                 flow_body) -> None:
    flow = alice.create(flow_body()).flow
    timer = threading.Timer(0.3, alice.start, args=(flow["id"],))
    timer.start()
    seen: list[str] = []
    try:
        answer = alice.wait_for_status(flow["id"], "starting", timeout=10,
                                       progress=lambda f: seen.append(f["status"]))
    finally:
        timer.join()
    assert answer["status"] == "starting"
    assert seen[0] == "inactive" and seen[-1] == "starting"
    assert session.paths.count(f"/flows/{flow['id']}") <= 4  # no polling
    with pytest.raises(StatusTimeout):
        alice.wait_for_status(flow["id"], "active", timeout=0.5)


@pytest.mark.parametrize("refusal", [404, 405, 429, 503])
def test_wait_for_status_polls_a_service_without_a_change_feed_for_it(
        app: Flask, token, flow_body, refusal: int) -> None:
    session = AppSession(app.test_client(), refused={"/flows/events": refusal})
    client = FlowRepositoryClient("http://oih.test", token("alice", "acme"), session=session)
    flow = client.create(flow_body()).flow
    client.start(flow["id"])
    assert client.wait_for_status(flow["id"], "starting", timeout=2)["status"] == "starting"
    if refusal in (404, 405):
        with pytest.raises(WatchNotSupported):
            next(client.watch(timeout=1))


def test_watch_refusals_are_raised(session: AppSession, token, alice, flow_body) -> None:
    with pytest.raises(Unauthorized):
        next(FlowRepositoryClient("http://flows.test", "wrong", session=session).watch())
    alice.create(flow_body())
    alice._token_provider = lambda: token("alice", "acme")
    app_store = session.client.application.extensions["flow_repository"].store
    from datetime import timedelta

    from flow_repository.adapters.store import utcnow
    app_store.changes.trim(utcnow() + timedelta(seconds=5))
    with pytest.raises(Gone):
        next(alice.watch(last_event_id="0", timeout=2))
