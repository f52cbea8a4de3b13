"""Identity over the wire: the served API asks a (fake) OIH IAM about every caller."""

from __future__ import annotations

import time

import pytest

from support import Served, bearer, eventually

from .conftest import SERVICE_TOKEN, FakeIam

pytestmark = pytest.mark.e2e


def test_missing_header_is_401_with_the_oih_message(api: Served, iam: FakeIam) -> None:
    for method, path in (("GET", "/flows"), ("POST", "/flows"),
                         ("POST", "/flows/0123456789abcdef01234567/start")):
        response = api.request(method, path, json={"name": "x"})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json() == {"errors": [{"message": "Missing authorization header.",
                                               "code": 401}]}
    for value in ("Basic dXNlcjpwdw==", "Bearer", "Bearer a b"):
        response = api.get("/flows", headers={"Authorization": value})
        assert response.status_code == 401, (value, response.text)
        assert response.json()["errors"][0]["code"] == 401
    assert iam.calls == []


def test_unauthenticated_request_is_refused_before_its_body_is_read(api: Served) -> None:
    response = api.request("POST", "/flows", data=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text
    assert response.json()["errors"][0]["message"] == "Missing authorization header."


def test_unknown_token_is_401(api: Served, iam: FakeIam) -> None:
    response = api.get("/flows", headers=bearer("a-token-iam-never-issued"))
    assert response.status_code == 401, response.text
    assert response.json()["errors"][0]["code"] == 401
    assert len(iam.calls_for("a-token-iam-never-issued")) == 1


def test_missing_permission_is_403(api: Served, iam: FakeIam, flow_body) -> None:
    reader = bearer(iam.grant("reader", "tenant-a", permissions=["flows.read"]))
    assert api.get("/flows", headers=reader).status_code == 200
    for method, path, body in (
        ("POST", "/flows", flow_body()),
        ("POST", "/flows", [flow_body()]),
        ("POST", "/flows/0123456789abcdef01234567/start", None),
        ("POST", "/flows/multiple/stop", ["0123456789abcdef01234567"]),
    ):
        response = api.request(method, path, headers=reader, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json() == {"errors": [{"message": "MISSING_PERMISSION", "code": 403}]}

    writer = bearer(iam.grant("writer", "tenant-a", permissions=["flows.write"]))
    bulk = api.request("POST", "/flows", headers=writer, json=[flow_body()])
    assert bulk.status_code == 403, "an array body needs flows.bulk as well"
    assert api.request("POST", "/flows", headers=writer, json=flow_body()).status_code == 201


@pytest.mark.parametrize("outage", ["down", "closed"])
def test_iam_outage_is_503_not_401(api: Served, iam: FakeIam, outage: str) -> None:
    token = iam.grant()
    iam.mode = outage
    response = api.get("/flows", headers=bearer(token))
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["errors"][0]["code"] == 503
    assert len(iam.calls_for(token)) >= 1

    iam.mode = "up"  # a failure is not cached: IAM back, the same token works
    assert api.get("/flows", headers=bearer(token)).status_code == 200


def test_service_token_and_basic_introspection_request(api: Served, iam: FakeIam) -> None:
    token = iam.grant("alice", "tenant-a")
    assert api.get("/flows", headers=bearer(token)).status_code == 200
    [call] = iam.calls_for(token)
    assert call.path == "/api/v1/tokens/introspect"
    assert call.headers["authorization"] == f"Bearer {SERVICE_TOKEN}"
    assert call.headers["x-auth-type"] == "basic"
    assert call.headers["content-type"].startswith("application/json")
    assert call.body == {"token": token}


# The cache is per process: these two serve one gunicorn worker (with a real MongoDB,
# ``serve`` runs WEB_CONCURRENCY of them), so that every request meets the same cache.


def test_introspection_is_cached_for_the_ttl(serve, iam: FakeIam) -> None:
    api = serve(IAM_TOKEN_CACHE_TTL="2", WEB_CONCURRENCY="1")
    token = iam.grant()
    first = time.monotonic()
    for _ in range(5):
        assert api.get("/flows", headers=bearer(token)).status_code == 200
    assert len(iam.calls_for(token)) == 1

    def asked_again() -> bool:
        assert api.get("/flows", headers=bearer(token)).status_code == 200
        return len(iam.calls_for(token)) == 2

    eventually(asked_again, 10, message="the cached introspection to expire", interval=0.1)
    assert time.monotonic() - first >= 1.9


def test_cache_is_per_token(serve, iam: FakeIam) -> None:
    api = serve(WEB_CONCURRENCY="1")
    one, two = iam.grant("u1"), iam.grant("u2")
    for token in (one, two, one, two, one):
        assert api.get("/flows", headers=bearer(token)).status_code == 200
    assert len(iam.calls_for(one)) == 1
    assert len(iam.calls_for(two)) == 1
