"""The client retries a DELETE only with If-Match, as its docstring says (issue 16)."""

from __future__ import annotations

from typing import Any

import requests

from flow_repository.client.rest import FlowRepositoryClient, Unavailable


class Busy(requests.Session):
    """Answers every request 503, counting them by method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.calls.append((method, dict(kwargs.get("headers") or {})))
        response = requests.Response()
        response.status_code = 503
        response._content = b'{"errors": [{"message": "busy", "code": 503}]}'
        response.headers["Content-Type"] = "application/json"
        return response


def client(session: Busy) -> FlowRepositoryClient:
    return FlowRepositoryClient("http://flows.invalid", "t", retries=2, backoff=0.0,
                                max_backoff=0.0, session=session)


def attempts(call: Any) -> None:
    """Make the call, which fails with 503 after its attempts."""
    try:
        call()
    except Unavailable:
        pass


def test_delete_without_if_match_is_tried_once() -> None:
    session = Busy()
    attempts(lambda: client(session).delete("0123456789abcdef01234567"))
    attempts(lambda: client(session).request("DELETE", "/flows/0123456789abcdef01234567"))
    assert [method for method, _ in session.calls] == ["DELETE", "DELETE"]


def test_delete_with_if_match_and_get_are_retried() -> None:
    session = Busy()
    attempts(lambda: client(session).delete("0123456789abcdef01234567", if_match=3))
    assert len(session.calls) == 3
    assert all(headers.get("If-Match") == '"3"' for _, headers in session.calls)
    session.calls.clear()
    attempts(lambda: client(session).request("GET", "/flows"))
    assert len(session.calls) == 3
