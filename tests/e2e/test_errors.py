"""Errors over the wire: every layer answers the one JSON error shape, never an HTML page."""

from __future__ import annotations

import pytest

from support import Served, bearer

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

LIMIT = 4096


@pytest.fixture
def small(serve) -> Served:
    """A served API whose body limit is a few kilobytes."""
    return serve(MAX_BODY_BYTES=str(LIMIT))


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    assert "<html" not in response.text.lower()
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"errors"}
    assert body["errors"] and all(error["code"] == status and error["message"]
                                  for error in body["errors"])
    return body


def test_unknown_route_is_json_404(small: Served, iam: FakeIam) -> None:
    assert_json_error(small.get("/no/such/route"), 404)
    assert_json_error(small.get("/no/such/route", headers=bearer(iam.grant())), 404)
    assert_json_error(small.get("/"), 404)


def test_wrong_method_is_json_405_with_allow(small: Served, iam: FakeIam) -> None:
    headers = bearer(iam.grant())
    response = small.request("PUT", "/flows", headers=headers, json={})
    assert_json_error(response, 405)
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert {"GET", "POST"} <= allowed
    assert_json_error(small.request("DELETE", "/flows", headers=headers), 405)
    assert_json_error(small.request("GET", "/flows/multiple/start", headers=headers), 405)


def test_malformed_json_is_400(small: Served, iam: FakeIam) -> None:
    headers = {**bearer(iam.grant()), "Content-Type": "application/json"}
    for body in (b"{\"name\": ", b"not json at all", b"{\"name\": NaN}", b""):
        assert_json_error(small.request("POST", "/flows", headers=headers, data=body), 400)
    assert_json_error(small.request("POST", "/flows/multiple/start", headers=headers,
                                    data=b"[\"abc\""), 400)


def test_invalid_flow_is_400(small: Served, iam: FakeIam, flow_body) -> None:
    headers = bearer(iam.grant())
    body = flow_body(nodes=2)
    body["graph"]["edges"][0]["target"] = "nowhere"
    assert_json_error(small.request("POST", "/flows", headers=headers, json=body), 400)
    assert_json_error(small.request("POST", "/flows", headers=headers,
                                    json={**flow_body(), "status": "active"}), 400)


def test_body_over_the_limit_is_413(small: Served, iam: FakeIam, flow_body) -> None:
    headers = bearer(iam.grant())
    body = flow_body(description="x" * (LIMIT * 2))
    body_413 = assert_json_error(small.request("POST", "/flows", headers=headers, json=body), 413)
    assert str(LIMIT) in body_413["errors"][0]["message"]

    def chunks():  # no Content-Length: the limit must hold for a streamed body too
        yield b'{"name": "streamed", "description": "'
        for _ in range(LIMIT // 512 + 2):
            yield b"y" * 512
        yield b'"}'

    streamed = small.request("POST", "/flows", headers={**headers,
                             "Content-Type": "application/json"}, data=chunks())
    assert_json_error(streamed, 413)
    # Just under the limit is fine.
    fits = flow_body()
    fits["graph"]["nodes"][0]["fields"]["blob"] = "z" * (LIMIT - 1024)
    assert small.request("POST", "/flows", headers=headers, json=fits).status_code == 201


def test_invalid_id_is_400_and_unknown_id_404(small: Served, iam: FakeIam) -> None:
    headers = bearer(iam.grant())
    for method, path in (("GET", "/flows/not-an-id"), ("PATCH", "/flows/12345"),
                         ("DELETE", "/flows/zzzzzzzzzzzzzzzzzzzzzzzz"),
                         ("POST", "/flows/not-an-id/start"), ("POST", "/flows/not-an-id/stop")):
        assert_json_error(small.request(method, path, headers=headers, json={"name": "x"}), 400)
    assert_json_error(small.get("/flows/0123456789abcdef01234567", headers=headers), 404)


def test_bad_query_arguments_are_400(small: Served, iam: FakeIam) -> None:
    headers = bearer(iam.grant())
    for params in ({"page[size]": "0"}, {"page[number]": "-1"}, {"sort": "password"},
                   {"page[size]": "abc"}):
        assert_json_error(small.get("/flows", headers=headers, params=params), 400)


def test_trailing_slash_is_the_same_route(small: Served, iam: FakeIam) -> None:
    response = small.get("/flows/", headers=bearer(iam.grant()))
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["total"] == 0


def test_api_docs_and_openapi(small: Served) -> None:
    docs = small.get("/api-docs")
    assert docs.status_code == 200
    assert docs.headers["Content-Type"].startswith("text/html")
    assert "swagger-ui" in docs.text.lower()
    spec = small.get("/openapi.json")
    assert spec.status_code == 200
    assert spec.headers["Content-Type"].startswith("application/json")
    document = spec.json()
    assert document["openapi"].startswith("3.")
    for path in ("/flows", "/flows/{flow_id}", "/flows/{flow_id}/start",
                 "/flows/multiple/start", "/healthcheck"):
        assert path in document["paths"], path
