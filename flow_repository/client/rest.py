"""A typed Python client for the Flow Repository REST API, built on requests."""

from __future__ import annotations

import codecs
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple, Self

import requests

try:
    _VERSION = version("flow-repository")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0"

USER_AGENT = f"flow-repository-client/{_VERSION} python-requests/{requests.__version__}"
MAX_PAGE_SIZE = 100  # today's maximum; a larger server maximum is used only if asked for
# DELETE is not here: a retried DELETE may remove a flow re-created meanwhile, so it is
# retried only with If-Match (then it can remove nothing but the revision it names).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT"})


# ----------------------------------------------------------------------------- errors


class FlowRepositoryError(Exception):
    """The service refused a request; ``messages`` are the ``errors[].message`` it sent."""

    def __init__(self, status: int, messages: Sequence[str], body: Any = None) -> None:
        self.status = status
        self.messages = list(messages) or [f"HTTP {status}"]
        self.body = body
        super().__init__("; ".join(self.messages))


class ValidationError(FlowRepositoryError):
    """400: the request (usually the flow) is invalid; ``problems`` lists every problem."""

    @property
    def problems(self) -> list[str]:
        return self.messages


class Unauthorized(FlowRepositoryError):
    """401: the token is missing, wrong or expired."""


class Forbidden(FlowRepositoryError):
    """403: the token lacks a permission."""


class NotFound(FlowRepositoryError):
    """404: no such flow, or not one the caller may see."""


class Conflict(FlowRepositoryError):
    """409: the flow's status forbids the change (e.g. it is not inactive)."""


class PreconditionFailed(FlowRepositoryError):
    """412: the flow changed since the revision named in If-Match."""


class Unavailable(FlowRepositoryError):
    """503 (IAM or the database is down), or the service could not be reached at all."""


class Gone(FlowRepositoryError):
    """410: a watch resumed from an event no longer kept; list the flows again."""


class TooManyRequests(FlowRepositoryError):
    """429: this caller has as many change streams open as the service allows."""


class WatchNotSupported(FlowRepositoryError):
    """The service has no change feed (an OIH original or an older version)."""


class StatusTimeout(FlowRepositoryError):
    """wait_for_status gave up; ``flow`` is the flow as last read."""

    def __init__(self, message: str, flow: Mapping[str, Any]) -> None:
        super().__init__(0, [message])
        self.flow = dict(flow)


ERRORS_BY_STATUS: dict[int, type[FlowRepositoryError]] = {
    400: ValidationError, 401: Unauthorized, 403: Forbidden, 404: NotFound,
    409: Conflict, 410: Gone, 412: PreconditionFailed, 429: TooManyRequests,
    503: Unavailable,
}


def error_for(response: requests.Response) -> FlowRepositoryError:
    """The error class and messages of a refused answer (any body shape, HTML included)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    messages: list[str] = []
    if isinstance(body, Mapping) and isinstance(body.get("errors"), list):
        messages = [str(item.get("message", item)) if isinstance(item, Mapping) else str(item)
                    for item in body["errors"]]
    elif response.text:
        messages = [response.text.strip()[:500]]
    kind = ERRORS_BY_STATUS.get(response.status_code, FlowRepositoryError)
    if kind is FlowRepositoryError and response.status_code == 422:
        kind = ValidationError
    return kind(response.status_code, messages, body)


# ----------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class FlowChange:
    """One event of GET /flows/events: its id (for Last-Event-ID), name and data."""

    id: str
    event: str  # created, modified, restored, status or deleted
    data: dict[str, Any]

    @property
    def flow_id(self) -> str | None:
        return self.data.get("id")

    @property
    def status(self) -> str | None:
        return self.data.get("status")

    @property
    def revision(self) -> int | None:
        return self.data.get("revision")


def parse_events(chunks: Iterable[bytes]) -> Iterator[FlowChange | None]:
    """The events of a text/event-stream, as bytes arrive; None for each block without an
    event (the opening comment, a keep-alive), so a reader can look at its clock."""
    buffer = ""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for chunk in chunks:
        buffer += decoder.decode(chunk)
        buffer = buffer.replace("\r\n", "\n")
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
            if "data" not in fields:
                yield None
                continue
            try:
                data = json.loads(fields["data"])
            except ValueError:
                data = {"raw": fields["data"]}
            yield FlowChange(fields.get("id", ""), fields.get("event", "message"),
                             data if isinstance(data, dict) else {"value": data})


class StoredFlow(NamedTuple):
    """A flow as the service returns it, with its revision (the ETag): ``flow, rev = ...``."""

    flow: dict[str, Any]
    revision: int | None


@dataclass(frozen=True)
class DryRun:
    """What a dry run answered: the flow as it would be stored, dropped fields, problems."""

    flow: dict[str, Any]
    ignored_fields: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def error_for_event(change: FlowChange) -> FlowRepositoryError:
    """The error an ``event: error`` of the stream carries (410, 503, ...)."""
    errors = change.data.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else {}
    code = first.get("code") if isinstance(first, Mapping) else None
    message = first.get("message") if isinstance(first, Mapping) else None
    status = code if isinstance(code, int) else 0
    kind = ERRORS_BY_STATUS.get(status, FlowRepositoryError)
    return kind(status, [str(message or "the change stream failed")], change.data)


def revision_of(response: requests.Response, flow: Mapping[str, Any] | None = None) -> int | None:
    """The revision an answer names: its ETag (``"3"``), else the flow's ``revision``."""
    tag = (response.headers.get("ETag") or "").strip()
    tag = tag.removeprefix("W/")
    tag = tag.strip('"')
    if tag.isdigit():
        return int(tag)
    value = (flow or {}).get("revision")
    return value if isinstance(value, int) else None


def _data(body: Any) -> Any:
    """``data`` of an enveloped answer; the body itself when there is no envelope."""
    if isinstance(body, Mapping) and "data" in body:
        return body["data"]
    return body


def _meta(body: Any) -> Mapping[str, Any]:
    meta = body.get("meta") if isinstance(body, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _texts(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(item.get("message", item)) if isinstance(item, Mapping) else str(item)
            for item in value]


def dry_run_of(body: Any) -> DryRun:
    """Read a dry-run answer whether the flow is ``data`` or ``data.flow`` and the extras
    sit in ``meta`` or next to the flow."""
    data = _data(body)
    meta = _meta(body)
    flow = data.get("flow") if isinstance(data, Mapping) and isinstance(
        data.get("flow"), Mapping) else data
    flow = dict(flow) if isinstance(flow, Mapping) else {}
    extras = [meta, data if isinstance(data, Mapping) else {},
              body if isinstance(body, Mapping) else {}]
    ignored = next((_texts(place["ignoredFields"]) for place in extras
                    if "ignoredFields" in place), [])
    problems = next((_texts(place[key]) for place in extras for key in ("problems", "warnings")
                     if key in place), [])
    for key in ("problems", "ignoredFields", "warnings"):  # extras sent beside the fields
        flow.pop(key, None)
    return DryRun(flow, ignored, problems)


# ----------------------------------------------------------------------------- the client


class FlowRepositoryClient:
    """Calls the Flow Repository REST API; raises a FlowRepositoryError subclass on refusal.

    ``token`` is a bearer token; ``token_provider`` is called before every request instead
    (for tokens that expire). 503 answers and unreachable servers are retried with
    exponential back-off and jitter, for idempotent calls only (GET, DELETE with If-Match,
    dry runs); ``retries`` is the number of extra attempts.
    """

    def __init__(self, base_url: str, token: str | None = None, *,
                 token_provider: Callable[[], str] | None = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 page_size: int = MAX_PAGE_SIZE,
                 session: requests.Session | None = None) -> None:
        if token is not None and token_provider is not None:
            raise ValueError("give token or token_provider, not both")
        self.base_url = base_url.rstrip("/")
        self._token_provider = token_provider or (lambda: token or "")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.page_size = page_size
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None, if_match: int | str | None = None,
                idempotent: bool | None = None) -> requests.Response:
        """One call; returns a 2xx answer or raises. Retries only idempotent calls."""
        headers: dict[str, str] = {}
        token = self._token_provider()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if if_match is not None:
            headers["If-Match"] = if_match if isinstance(if_match, str) else f'"{if_match}"'
        if idempotent is None:
            idempotent = method.upper() in IDEMPOTENT or (
                method.upper() == "DELETE" and if_match is not None)
        retry = idempotent
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                response = self.session.request(method, self.base_url + path, params=params,
                                                json=json, headers=headers,
                                                timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure: FlowRepositoryError = Unavailable(
                    0, [f"{self.base_url} could not be reached: {error.__class__.__name__}"])
                retry_after = None
            else:
                if response.status_code < 300:
                    return response
                failure = error_for(response)
                if not isinstance(failure, Unavailable):
                    raise failure
                retry_after = response.headers.get("Retry-After")
            if attempt + 1 >= attempts:
                raise failure
            time.sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Full-jitter exponential back-off, never shorter than a (capped) Retry-After."""
        delay = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt))
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), self.max_backoff))
        return delay

    def _json(self, *args: Any, **kwargs: Any) -> Any:
        response = self.request(*args, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise FlowRepositoryError(response.status_code,
                                      ["the answer is not JSON"]) from None

    def _stored(self, response: requests.Response) -> StoredFlow:
        flow = _data(response.json())
        flow = dict(flow) if isinstance(flow, Mapping) else {}
        return StoredFlow(flow, revision_of(response, flow))

    # ------------------------------------------------------------------ flows

    def list(self, *, status: str | None = None, type: str | None = None,
             user: str | None = None, from_template: str | None = None,
             search: str | None = None, sort: str | None = None,
             page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """Every flow the caller may see that matches the filters, page after page."""
        params: dict[str, Any] = {"page[size]": page_size or self.page_size}
        for name, value in (("filter[status]", status), ("filter[type]", type),
                            ("filter[user]", user), ("filter[fromTemplate]", from_template),
                            ("search", search), ("sort", sort)):
            if value is not None:
                params[name] = value
        return self._pages("/flows", params)

    def _pages(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a paged list, asking for page after page until the last one."""
        number = 1
        while True:
            body = self._json("GET", path, params={**params, "page[number]": number})
            items = _data(body) or []
            yield from items
            meta = _meta(body)
            total_pages = meta.get("totalPages")
            per_page = meta.get("perPage") or params["page[size]"]
            if isinstance(total_pages, int):
                if number >= total_pages:
                    return
            elif len(items) < per_page:
                return
            if not items:
                return
            number += 1

    def get(self, flow_id: str) -> StoredFlow:
        """One flow and its revision."""
        return self._stored(self.request("GET", f"/flows/{flow_id}"))

    def create(self, flow: Mapping[str, Any]) -> StoredFlow:
        """Create a flow (not retried: a retry could create it twice)."""
        return self._stored(self.request("POST", "/flows", json=dict(flow)))

    def update(self, flow_id: str, changes: Mapping[str, Any],
               if_match: int | str | None = None) -> StoredFlow:
        """Change the named fields of an inactive flow; with ``if_match``, only at that
        revision (PreconditionFailed otherwise). Retried only with ``if_match``."""
        response = self.request("PATCH", f"/flows/{flow_id}", json=dict(changes),
                                if_match=if_match, idempotent=if_match is not None)
        return self._stored(response)

    def delete(self, flow_id: str, if_match: int | str | None = None) -> None:
        """Delete an inactive flow; with ``if_match``, only at that revision. Retried only
        with ``if_match``."""
        self.request("DELETE", f"/flows/{flow_id}", if_match=if_match,
                     idempotent=if_match is not None)

    def start(self, flow_id: str) -> dict[str, Any]:
        """Ask for a start; answers ``{id, status}`` (status ``starting``)."""
        return _data(self._json("POST", f"/flows/{flow_id}/start"))

    def stop(self, flow_id: str) -> dict[str, Any]:
        """Ask for a stop; answers ``{id, status}`` (status ``stopping``)."""
        return _data(self._json("POST", f"/flows/{flow_id}/stop"))

    # ------------------------------------------------------------------ watching

    def watch(self, *, status: str | None = None, type: str | None = None,
              user: str | None = None, from_template: str | None = None,
              include_flow: bool = False, last_event_id: str | None = None,
              timeout: float | None = None, read_timeout: float = 60.0
              ) -> Iterator[FlowChange]:
        """Every change of the flows the caller may read, as it happens (GET /flows/events).

        A generator: it reconnects by itself (with back-off) when the stream ends or
        breaks, sending the id of the last change it yielded as Last-Event-ID, so no
        change is lost or repeated. ``last_event_id`` resumes from an earlier run;
        ``timeout`` ends it after that many seconds (None: never). Raises Gone (410) when
        the resume point is no longer kept, WatchNotSupported when the service has no
        change feed, and the usual errors (401, 403, 400) at once."""
        params: dict[str, Any] = {}
        for name, value in (("filter[status]", status), ("filter[type]", type),
                            ("filter[user]", user), ("filter[fromTemplate]", from_template)):
            if value is not None:
                params[name] = value
        if include_flow:
            params["include"] = "flow"
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._changes(params, last_event_id, deadline, read_timeout)
        try:
            for change in stream:
                if change is not None:
                    yield change
        finally:
            stream.close()

    def _changes(self, params: Mapping[str, Any], last_event_id: str | None,
                 deadline: float | None, read_timeout: float, *, first_try_only: bool = False
                 ) -> Iterator[FlowChange | None]:
        """The events of GET /flows/events across reconnections; None whenever the stream
        (re)opens or sends a keep-alive. Ends at ``deadline``. ``first_try_only``: a first
        opening that fails (429, 503, unreachable) raises instead of being retried."""
        attempt = 0
        opened = False
        last = last_event_id
        while deadline is None or time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream"}
            token = self._token_provider()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if last:
                headers["Last-Event-ID"] = last
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            wait = read_timeout if left is None else min(read_timeout, left)
            failure: FlowRepositoryError | None = None
            retry_after = None
            try:
                with self.session.get(self.base_url + "/flows/events", params=params,
                                      headers=headers, stream=True,
                                      timeout=(self.timeout, wait)) as response:
                    if response.status_code in (404, 405, 501):
                        raise WatchNotSupported(response.status_code, [
                            (f"{self.base_url} has no change feed (GET /flows/events "
                            f"answered {response.status_code})")])
                    if response.status_code >= 300:
                        failure = error_for(response)
                        retry_after = response.headers.get("Retry-After")
                        if not isinstance(failure, Unavailable | TooManyRequests) or (
                                first_try_only and not opened):
                            raise failure
                    elif not response.headers.get("Content-Type", "").startswith(
                            "text/event-stream"):
                        raise WatchNotSupported(response.status_code, [
                            (f"{self.base_url} answered GET /flows/events with "
                            f"{response.headers.get('Content-Type')}, not an event stream")])
                    else:
                        opened = True
                        for change in parse_events(response.iter_content(chunk_size=None)):
                            if change is not None and change.event == "error":
                                failure = error_for_event(change)
                                if not isinstance(failure, Unavailable):
                                    raise failure
                                break
                            attempt = 0
                            if change is not None and change.id:
                                last = change.id
                            yield change
                            if deadline is not None and time.monotonic() >= deadline:
                                return
            except (requests.ConnectionError, requests.Timeout) as error:
                if first_try_only and not opened:
                    raise Unavailable(0, [(f"{self.base_url} could not be reached: "
                                          f"{error.__class__.__name__}")]) from None
                # a stream cut or quiet for read_timeout: reconnect
            if failure is not None or attempt:
                time.sleep(self._delay(attempt, retry_after))
            attempt += 1

    def wait_for_status(self, flow_id: str, status: str | Iterable[str], timeout: float = 60.0,
                        interval: float = 0.5,
                        progress: Callable[[dict[str, Any]], None] | None = None
                        ) -> dict[str, Any]:
        """Wait until the flow's status is ``status`` (or one of several); StatusTimeout
        after ``timeout`` seconds. ``progress`` sees the flow after every read.

        Watches the change feed (one read when the flow changes); against a service
        without one (an OIH original) it polls every ``interval`` seconds."""
        wanted = {status} if isinstance(status, str) else set(status)
        deadline = time.monotonic() + timeout
        stream = self._changes({}, None, deadline, read_timeout=max(1.0, timeout),
                               first_try_only=True)
        try:
            next(stream, None)  # opened: no change from now on can be missed
        except (WatchNotSupported, ValidationError, TooManyRequests, Unavailable):
            # no change feed (an OIH original, an older version), or none for us now
            stream.close()
            return self._poll_status(flow_id, wanted, timeout, deadline, interval, progress)
        try:
            flow = self.get(flow_id).flow
            while True:
                if progress is not None:
                    progress(flow)
                if flow.get("status") in wanted:
                    return flow
                for change in stream:
                    if change is not None and change.flow_id == flow_id:
                        if change.event == "deleted":
                            raise NotFound(404, [f"flow {flow_id} was deleted"])
                        break
                else:
                    raise StatusTimeout(
                        f"flow {flow_id} is still {flow.get('status')} after {timeout:g}s "
                        f"(waited for {' or '.join(sorted(wanted))})", flow)
                flow = self.get(flow_id).flow
        finally:
            stream.close()

    def _poll_status(self, flow_id: str, wanted: set[str], timeout: float, deadline: float,
                     interval: float, progress: Callable[[dict[str, Any]], None] | None
                     ) -> dict[str, Any]:
        while True:
            flow = self.get(flow_id).flow
            if progress is not None:
                progress(flow)
            if flow.get("status") in wanted:
                return flow
            if time.monotonic() >= deadline:
                raise StatusTimeout(
                    f"flow {flow_id} is still {flow.get('status')} after {timeout:g}s "
                    f"(waited for {' or '.join(sorted(wanted))})", flow)
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------ history and dry runs

    def revisions(self, flow_id: str, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """Every history entry of a flow, newest first."""
        return self._pages(f"/flows/{flow_id}/revisions",
                           {"page[size]": page_size or self.page_size})

    def revision(self, flow_id: str, revision: int) -> dict[str, Any]:
        """The flow as it was at ``revision`` (the history entry carries it under ``flow``)."""
        entry = _data(self._json("GET", f"/flows/{flow_id}/revisions/{revision}"))
        return entry.get("flow", entry) if isinstance(entry, dict) else entry

    def diff(self, flow_id: str, from_revision: int,
             to_revision: int | None = None) -> list[dict[str, Any]]:
        """The JSON Patch (RFC 6902) from one revision to another (default: the current)."""
        params: dict[str, Any] = {"from": from_revision}
        if to_revision is not None:
            params["to"] = to_revision
        answer = _data(self._json("GET", f"/flows/{flow_id}/diff", params=params))
        # The service answers {from, to, patch}; a bare patch list is read as well.
        patch = answer.get("patch") if isinstance(answer, dict) else answer
        return list(patch or [])

    def restore(self, flow_id: str, revision: int,
                if_match: int | str | None = None) -> StoredFlow:
        """Make an old revision current again, as a new revision."""
        response = self.request("POST", f"/flows/{flow_id}/restore",
                                json={"revision": revision}, if_match=if_match,
                                idempotent=if_match is not None)
        return self._stored(response)

    def validate(self, flow: Mapping[str, Any]) -> DryRun:
        """Check a flow without storing it: every check a create runs."""
        return dry_run_of(self._json("POST", "/flows/validate", json=dict(flow),
                                     idempotent=True))

    def dry_run_create(self, flow: Mapping[str, Any]) -> DryRun:
        """What POST /flows would store, without storing it."""
        return dry_run_of(self._json("POST", "/flows", params={"dryRun": "true"},
                                     json=dict(flow), idempotent=True))

    def dry_run_update(self, flow_id: str, changes: Mapping[str, Any],
                       if_match: int | str | None = None) -> DryRun:
        """What PATCH /flows/{id} would store, without storing it."""
        return dry_run_of(self._json("PATCH", f"/flows/{flow_id}", params={"dryRun": "true"},
                                     json=dict(changes), if_match=if_match, idempotent=True))
