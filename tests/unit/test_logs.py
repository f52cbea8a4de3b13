"""Structured logs: one JSON object per line, with the request id, and never a token."""

from __future__ import annotations

import json
import logging

from flow_repository.server.logs import REQUEST_ID


def test_a_record_is_one_json_line_with_level_logger_message_and_extras(log_lines) -> None:
    logging.getLogger("flow_repository.test").warning("relay paused", extra={"retryIn": 0.4})
    [line] = [entry for entry in log_lines() if entry["logger"] == "flow_repository.test"]
    assert line["level"] == "warning"
    assert line["message"] == "relay paused"
    assert line["retryIn"] == 0.4
    assert line["time"].endswith("+00:00")


def test_the_current_request_id_is_on_every_line(log_lines) -> None:
    token = REQUEST_ID.set("req-42")
    try:
        logging.getLogger("flow_repository.test").info("inside a request")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("flow_repository.test").info("outside")
    inside, outside = [e for e in log_lines() if e["logger"] == "flow_repository.test"]
    assert inside["requestId"] == "req-42"
    assert "requestId" not in outside


def test_secret_looking_extras_are_redacted(log_lines) -> None:
    logging.getLogger("flow_repository.test").info(
        "careless call", extra={"authorization": "Bearer abc.def.ghi", "token": "abc.def.ghi"})
    [line] = [e for e in log_lines() if e["logger"] == "flow_repository.test"]
    assert line["authorization"] == "[redacted]"
    assert line["token"] == "[redacted]"
    assert "abc.def.ghi" not in json.dumps(line)


def test_requests_log_their_request_id_and_never_the_token(
    client, auth, flow_body, log_lines
) -> None:
    headers = auth()
    token = headers["Authorization"].split()[1]
    created = client.post("/flows", json=flow_body(), headers={**headers, "X-Request-Id": "r-1"})
    assert created.status_code == 201
    assert created.headers["X-Request-Id"] == "r-1"
    client.get("/flows/not-an-id", headers=headers)
    client.get("/flows", headers={"Authorization": "Bearer forged.token.value"})
    lines = log_lines()
    [creation] = [entry for entry in lines if entry["message"] == "flow created"]
    assert creation["requestId"] == "r-1"
    assert creation["flowId"] == created.get_json()["data"]["id"]
    text = "\n".join(json.dumps(entry) for entry in lines)
    assert token not in text
    assert "forged.token.value" not in text
