"""Credentials never reach a log line: query parameters, Authorization values, URL userinfo."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from flow_repository.server.logs import JsonFormatter
from flow_repository.server.redaction import redact


@pytest.mark.parametrize(("text", "secret"), [
    ("page[size]=1&access_token=eyJhbGciOi.eyJzdWIi.sig", "eyJhbGciOi"),
    ("token=tok-123&x=1", "tok-123"),
    ("id_token=idt-9", "idt-9"),
    ("api_key=key-1&APIKEY=key-2", "key-"),
    ("password=hunter2", "hunter2"),
    ("secret=s3cr3t; other", "s3cr3t"),
    ("client_secret%3Dcs-1", "cs-1"),
    ("Authorization: Bearer eyJhbGciOi.x.y", "eyJhbGciOi"),
    ('{"authorization": "Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz"),
    ("calling IAM with Bearer user-token-0123456789", "user-token-0123456789"),
    ("broker unreachable at amqp://flow:QueuePass@rabbit:5672/%2F", "QueuePass"),
    ("mongodb://u:MongoPass@h1,h2/db?replicaSet=rs", "MongoPass"),
    ("https://ghp_abcdef@github.com/org/repo", "ghp_abcdef"),
])
def test_every_kind_of_credential_is_redacted(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted and "[redacted]" in redacted


@pytest.mark.parametrize("text", ["identity mode: IAM introspection (basic)",
                                  "GET /flows?page%5Bsize%5D=10&tokens=3", "a bearer token"])
def test_ordinary_text_is_left_as_it_is(text: str) -> None:
    assert redact(text) == text


def test_the_json_formatter_redacts_message_fields_and_tracebacks() -> None:
    try:
        raise ConnectionError("cannot reach amqp://u:TracePass@h")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1,
                                   "GET %s failed", ("/flows?access_token=MsgToken",), True)
        record.exc_info = sys.exc_info()
    record.queue_url = "amqp://u:FieldPass@h"
    record.headers = {"Authorization": "Bearer NestedToken123", "accept": "json"}
    record.token = "PlainToken"
    line = JsonFormatter().format(record)
    for secret in ("TracePass", "MsgToken", "FieldPass", "NestedToken123", "PlainToken"):
        assert secret not in line
    entry = json.loads(line)
    assert entry["queue_url"] == "amqp://u:[redacted]@h"
    assert entry["headers"]["accept"] == "json"
