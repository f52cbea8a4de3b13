"""The Python client against a served process: paging, revisions, errors, retries, waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jwt
import pytest

from flow_repository.client.rest import (
    USER_AGENT,
    Conflict,
    FlowRepositoryClient,
    NotFound,
    PreconditionFailed,
    StatusTimeout,
    Unauthorized,
    Unavailable,
    ValidationError,
)
from support import Bus, Served, eventually, free_port

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

FAST_RETRIES = {"retries": 2, "backoff": 0.01, "max_backoff": 0.05, "timeout": 10}


@pytest.fixture
def connect(api: Served, iam: FakeIam) -> Callable[..., FlowRepositoryClient]:
    """connect(token=None, **options): a client of the served API (a fresh user by default)."""
    clients: list[FlowRepositoryClient] = []

    def make(token: str | None = None, **options) -> FlowRepositoryClient:
        client = FlowRepositoryClient(api.base_url, token or iam.grant("client-user", "acme"),
                                      **{**FAST_RETRIES, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_list_walks_every_page_with_filters(connect, flow_body) -> None:
    client = connect(page_size=3)
    created = [client.create(flow_body(f"Flow {i:02d}")).flow["id"] for i in range(8)]
    listed = [flow["id"] for flow in client.list()]
    assert listed == created  # createdAt ascending, every page once
    assert [f["name"] for f in client.list(sort="-name")][:2] == ["Flow 07", "Flow 06"]
    assert [f["name"] for f in client.list(search="flow 05")] == ["Flow 05"]
    assert list(client.list(status="active")) == []
    assert len(list(client.list(status="inactive", page_size=100))) == 8


def test_get_returns_the_flow_and_its_revision_and_update_honours_it(connect,
                                                                     flow_body) -> None:
    client = connect()
    created = client.create(flow_body("Original"))
    assert created.revision == 1
    flow, revision = client.get(created.flow["id"])
    assert (flow["name"], revision) == ("Original", 1)

    updated = client.update(flow["id"], {"name": "Renamed"}, if_match=revision)
    assert (updated.flow["name"], updated.revision) == ("Renamed", 2)
    with pytest.raises(PreconditionFailed) as stale:
        client.update(flow["id"], {"name": "lost update"}, if_match=revision)
    assert stale.value.status == 412
    with pytest.raises(PreconditionFailed):
        client.delete(flow["id"], if_match=revision)
    assert client.get(flow["id"]).flow["name"] == "Renamed"

    client.delete(flow["id"], if_match=updated.revision)
    with pytest.raises(NotFound) as gone:
        client.get(flow["id"])
    assert gone.value.status == 404


def test_validation_error_carries_every_problem(connect, flow_body) -> None:
    client = connect()
    body = flow_body(nodes=2)
    body["graph"]["nodes"][0]["componentId"] = "abc"
    body["graph"]["edges"][0]["target"] = "nowhere"
    with pytest.raises(ValidationError) as invalid:
        client.create(body)
    assert invalid.value.status == 400
    assert len(invalid.value.problems) >= 2
    assert any("componentId" in problem for problem in invalid.value.problems)
    assert any("nowhere" in problem for problem in invalid.value.problems)
    assert list(client.list()) == []


def test_sends_its_user_agent_and_a_token_from_the_provider(api: Served, iam: FakeIam,
                                                            flow_body) -> None:
    issued: list[str] = []

    def fresh_token() -> str:  # e.g. an OAuth client refreshing a short-lived token
        issued.append(iam.grant("rotating", "acme"))
        return issued[-1]

    client = FlowRepositoryClient(api.base_url, token_provider=fresh_token)
    client.create(flow_body("one"))
    assert [flow["name"] for flow in client.list()] == ["one"]
    assert len(issued) == 2 and issued[0] != issued[1]
    assert len(iam.calls_for(issued[1])) == 1
    assert USER_AGENT.startswith("flow-repository-client/1.")
    # gunicorn's access log (JSON lines on stdout) names the agent of every request
    eventually(lambda: USER_AGENT in api.stdout_path.read_text(), 10,
             message="the access log to name the client")


def test_wrong_token_is_unauthorized(connect, iam: FakeIam) -> None:
    client = connect(token="a-token-iam-never-issued")
    with pytest.raises(Unauthorized) as refused:
        list(client.list())
    assert refused.value.status == 401
    assert len(iam.calls_for("a-token-iam-never-issued")) == 1, "a 401 is never retried"


def test_expired_token_is_unauthorized(serve) -> None:
    secret = "client-test-secret-of-32-bytes-or-more"
    served = serve(JWT_SECRET=secret)
    claims = {"sub": "late", "tenant": "acme", "permissions": ["flows.read"]}
    expired = jwt.encode({**claims, "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    valid = jwt.encode({**claims, "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    assert list(FlowRepositoryClient(served.base_url, valid).list()) == []
    with pytest.raises(Unauthorized) as refused:
        list(FlowRepositoryClient(served.base_url, expired).list())
    assert "expired" in str(refused.value).lower()


def test_iam_down_is_unavailable_retried_only_when_idempotent(connect, iam: FakeIam,
                                                              flow_body) -> None:
    token = iam.grant("unlucky", "acme")  # never cached: every request asks IAM
    client = connect(token=token)
    iam.mode = "down"
    with pytest.raises(Unavailable) as listing:
        list(client.list())
    assert listing.value.status == 503
    assert len(iam.calls_for(token)) == 3, "a GET is tried 1 + retries times"
    with pytest.raises(Unavailable):
        client.create(flow_body())
    assert len(iam.calls_for(token)) == 4, "a POST is never retried"
    with pytest.raises(Unavailable):
        client.update("0123456789abcdef01234567", {"name": "x"})
    assert len(iam.calls_for(token)) == 5, "a PATCH without If-Match is never retried"


def test_a_retry_rides_out_a_short_outage(connect, iam: FakeIam, flow_body) -> None:
    created = connect(token=iam.grant("patient", "acme")).create(flow_body("survivor"))
    token = iam.grant("patient", "acme")  # a token the service has not cached yet
    client = connect(token=token, retries=5, backoff=0.2, max_backoff=0.4)
    iam.mode = "down"

    def recover() -> None:
        eventually(lambda: len(iam.calls_for(token)) >= 2, 10, message="two failed attempts")
        iam.mode = "up"

    helper = threading.Thread(target=recover)
    helper.start()
    try:
        assert client.get(created.flow["id"]).flow["name"] == "survivor"
    finally:
        helper.join(10)
    assert len(iam.calls_for(token)) >= 3


def test_database_down_is_unavailable(serve, iam: FakeIam) -> None:
    served = serve(MONGODB_URL="mongodb://127.0.0.1:9/flows", MONGODB_TIMEOUT_MS="200")
    client = FlowRepositoryClient(served.base_url, iam.grant(), **FAST_RETRIES)
    with pytest.raises(Unavailable) as down:
        list(client.list())
    assert down.value.messages == ["Database is unavailable; retry later."]


def test_unreachable_service_is_unavailable(flow_body) -> None:
    client = FlowRepositoryClient(f"http://127.0.0.1:{free_port()}", "t", **FAST_RETRIES)
    with pytest.raises(Unavailable) as unreachable:
        client.get("0123456789abcdef01234567")
    assert unreachable.value.status == 0
    assert "could not be reached" in str(unreachable.value)


def test_start_wait_and_stop_follow_the_orchestrator(connect, bus: Bus, listener,
                                                     flow_body) -> None:
    events = listener()
    client = connect()
    flow_id = client.create(flow_body("lifecycle")).flow["id"]
    assert client.start(flow_id) == {"id": flow_id, "status": "starting"}
    with pytest.raises(Conflict):
        client.start(flow_id)
    with pytest.raises(StatusTimeout) as early:
        client.wait_for_status(flow_id, "active", timeout=0.3, interval=0.1)
    assert early.value.flow["status"] == "starting"
    with pytest.raises(Conflict):
        client.update(flow_id, {"name": "not while starting"})

    events.wait("flow.starting", flow_id)
    bus.publish("flow.started", flow_id)
    seen: list[str] = []
    active = client.wait_for_status(flow_id, "active", timeout=15, interval=0.1,
                                    progress=lambda flow: seen.append(flow["status"]))
    assert active["status"] == "active" and seen[-1] == "active"

    assert client.stop(flow_id)["status"] == "stopping"
    events.wait("flow.stopping", flow_id)
    bus.publish("flow.stopped", flow_id)
    assert client.wait_for_status(flow_id, {"inactive"}, timeout=15)["status"] == "inactive"


def test_history_diff_and_validate(connect, flow_body) -> None:
    """Needs the history routes (issue 10): revisions, one revision, diff, restore, validate."""
    client = connect()
    created = client.create(flow_body("v1"))
    flow_id = created.flow["id"]
    client.update(flow_id, {"name": "v2"}, if_match=created.revision)
    entries = list(client.revisions(flow_id, page_size=1))
    assert [entry["revision"] for entry in entries] == [2, 1], "newest first, every page"
    assert client.revision(flow_id, 1)["name"] == "v1"
    patch = client.diff(flow_id, 1)
    assert {"op": "replace", "path": "/name", "value": "v2"} in patch
    assert not any(operation["path"].startswith("/graph") for operation in patch)
    assert client.diff(flow_id, 1, 2) == patch
    restored = client.restore(flow_id, 1, if_match=2)
    assert (restored.flow["name"], restored.revision) == ("v1", 3)

    checked = client.validate(flow_body("fine"))
    assert checked.problems == [] and checked.flow["name"] == "fine"
    planned = client.dry_run_update(flow_id, {"name": "maybe"}, if_match=3)
    assert planned.flow["name"] == "maybe"
    after = client.get(flow_id)
    assert (after.flow["name"], after.revision) == ("v1", 3), "a dry run writes nothing"
