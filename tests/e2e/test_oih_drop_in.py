"""The served service as OIH configures it: IAM answering account documents, OIH's request and
response shapes, step logs from a logging service, and gunicorn's own errors as JSON."""

from __future__ import annotations

import json
import socket

import pytest

from support import Served, bearer

from .conftest import SERVICE_TOKEN, FakeIam

pytestmark = pytest.mark.e2e


def test_oih_clients_against_the_served_api(serve, iam: FakeIam, http_service, flow_body) -> None:
    logs = {"data": [{"msg": "fetched 3 persons"}], "meta": {}}
    logging_service = http_service(lambda exchange: (200, logs))
    api: Served = serve(LOGGING_SERVICE_BASE_URL=logging_service.url,
                        LOGGING_SERVICE_TIMEOUT_SECONDS="2")
    account_id = "5d9f1e2a3b4c5d6e7f809102"  # IAM's account document has `_id`, no `sub`
    headers = bearer(iam.grant(account_id, "tenant-a"))

    # The web UI adds `privileged` to new nodes: dropped and named, 201.
    body = flow_body(nodes=2)
    body["graph"]["nodes"][0]["privileged"] = False
    created = api.request("POST", "/flows", headers=headers, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["meta"] == {"ignoredFields": ["graph.nodes[0].privileged"]}
    flow = created.json()["data"]
    assert {"id": account_id, "type": "user"} in flow["owners"]

    # The flow detail page PATCHes back what it read, status included.
    read = api.get(f"/flows/{flow['id']}", headers=headers).json()
    assert read["meta"] == {}
    patched = api.request("PATCH", f"/flows/{flow['id']}", headers=headers,
                          json={**read["data"], "name": "renamed"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["data"]["name"] == "renamed"

    # dev-tools load-test.js lists 1000 at a time; OIH's status codes filter.
    listed = api.get("/flows?page[size]=1000&filter[status]=0", headers=headers).json()
    assert listed["meta"]["perPage"] == 1000
    assert [item["id"] for item in listed["data"]] == [flow["id"]]

    # Step logs: proxied with the service's token, the caller's query passed on.
    answer = api.get(f"/flows/{flow['id']}/steps/step_0/logs?page=2&level=30", headers=headers)
    assert (answer.status_code, answer.json()) == (200, logs)
    [call] = logging_service.calls
    assert call.path == f"/logs/flows/{flow['id']}/steps/step_0?page=2&level=30"
    assert call.headers["authorization"] == f"Bearer {SERVICE_TOKEN}"
    logging_service.slow = True
    slow = api.get(f"/flows/{flow['id']}/steps/step_0/logs", headers=headers)
    assert slow.status_code == 504, slow.text
    assert slow.json()["errors"][0]["code"] == 504
    assert SERVICE_TOKEN not in slow.text

    # Several starts: a bare array aligned with the ids.
    started = api.request("POST", "/flows/multiple/start", headers=headers,
                          json=[flow["id"], "nonsense"])
    assert started.status_code == 200, started.text
    assert started.json()[0] == {"data": {"id": flow["id"], "status": "starting"}, "meta": {}}
    assert started.json()[1]["errors"][0]["flowId"] == "nonsense"
    assert SERVICE_TOKEN not in api.stderr()


def raw_exchange(api: Served, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no HTTP library would send them) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_errors_gunicorn_raises_itself_are_json(serve, iam: FakeIam) -> None:
    api: Served = serve()
    cases = {
        b"GET /flows?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": 414,
        b"THIS IS NOT HTTP\r\n\r\n": 400,
        b"GET /flows HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n": 400,
        b"GET /flows HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n": 431,
    }
    for request, status in cases.items():
        answer, headers, body = raw_exchange(api, request)
        assert answer == status, (request[:40], body)
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        errors = json.loads(body)["errors"]
        assert [error["code"] for error in errors] == [status]
        assert "<html" not in body.decode().lower()
    # The service still answers normally afterwards.
    assert api.get("/flows", headers=bearer(iam.grant())).status_code == 200
