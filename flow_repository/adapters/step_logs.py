"""Client of OIH's logging service: the logs of one step of a flow, streamed back as answered."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import requests

from flow_repository.contract import error_body
from flow_repository.domain.flow import FlowError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# An error body is read whole to check it is JSON; a bigger one is replaced by our own.
ERROR_BODY_MAX_BYTES = 64 * 1024


class StepLogsNotConfigured(FlowError):
    """This installation names no logging service (LOGGING_SERVICE_BASE_URL is unset)."""

    status = 501


class LoggingServiceUnavailable(FlowError):
    """The logging service cannot be reached or gave an answer that cannot be passed on."""

    status = 502


class LoggingServiceTimeout(FlowError):
    """The logging service did not answer within LOGGING_SERVICE_TIMEOUT_SECONDS."""

    status = 504


@dataclass
class StepLogs:
    """The logging service's answer: its status, content type and body, read as it streams."""

    status: int
    content_type: str
    chunks: Iterator[bytes]


class StepLogClient:
    """GETs ``{base}/logs/flows/{flowId}/steps/{stepId}`` with the service's IAM token."""

    def __init__(self, base_url: str, iam_token: str | None, timeout: float,
                 session: requests.Session | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._iam_token = iam_token
        self._timeout = timeout
        self._session = session if session is not None else requests.Session()

    def fetch(self, flow_id: str, step_id: str, query: str) -> StepLogs:
        """Ask for one step's logs; ``query`` is the caller's query string, passed as is."""
        url = f"{self._base_url}/logs/flows/{quote(flow_id, safe='')}/steps/{quote(step_id, safe='')}"
        if query:
            url = f"{url}?{query}"
        headers = {"accept": "application/json"}
        if self._iam_token:
            headers["authorization"] = f"Bearer {self._iam_token}"
        try:
            # Redirects are not followed: the service's token goes to this one address only.
            upstream = self._session.get(url, headers=headers, timeout=self._timeout,
                                         stream=True, allow_redirects=False)
        except requests.Timeout:
            log.warning("logging service timed out", extra={"flowId": flow_id})
            raise LoggingServiceTimeout("the logging service did not answer in time; "
                                        "retry later") from None
        except requests.RequestException as error:
            # Only the error's type: its text could carry the URL and nothing more is needed.
            log.warning("logging service unreachable", extra={"flowId": flow_id,
                                                              "error": type(error).__name__})
            raise LoggingServiceUnavailable("the logging service is unavailable; "
                                            "retry later") from None
        return self._answer(upstream, flow_id)

    def _answer(self, upstream: requests.Response, flow_id: str) -> StepLogs:
        status = upstream.status_code
        content_type = upstream.headers.get("Content-Type", "application/json")
        if status in (401, 403) or 300 <= status < 400 or status < 200:
            # A refusal of the service's own token is not the caller's fault, and passing a
            # 401 on would log OIH's web UI out.
            upstream.close()
            log.warning("logging service refused the request",
                        extra={"flowId": flow_id, "upstreamStatus": status})
            raise LoggingServiceUnavailable(
                f"the logging service answered HTTP {status} to the flow repository")
        if status >= 400:
            body = _json_error(upstream, status, secret=self._iam_token)
            return StepLogs(status, "application/json", iter([body]))
        return StepLogs(status, content_type, _stream(upstream))


def _stream(upstream: requests.Response) -> Iterator[bytes]:
    try:
        yield from upstream.iter_content(CHUNK_BYTES)
    except requests.RequestException as error:
        # The status is already sent; the caller sees a body cut short.
        log.warning("logging service answer broke off", extra={"error": type(error).__name__})
    finally:
        upstream.close()


def _json_error(upstream: requests.Response, status: int, secret: str | None) -> bytes:
    """An upstream error in the service's error shape, keeping the upstream's messages
    (with ``secret``, the service's token, blotted out should the upstream echo it)."""
    try:
        raw = upstream.raw.read(ERROR_BODY_MAX_BYTES + 1, decode_content=True)
    except Exception:  # noqa: BLE001 - whatever broke, the caller gets our own message
        raw = b""
    finally:
        upstream.close()
    messages = []
    try:
        body = json.loads(raw) if len(raw) <= ERROR_BODY_MAX_BYTES else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        items = body.get("errors") if isinstance(body.get("errors"), list) else [body]
        messages = [item["message"] for item in items
                    if isinstance(item, dict) and isinstance(item.get("message"), str)]
    if secret:
        messages = [message.replace(secret, "[redacted]") for message in messages]
    messages = messages or [f"the logging service answered HTTP {status}"]
    return json.dumps(error_body(status, *messages)).encode()
