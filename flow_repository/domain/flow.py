"""Pure flow rules: statuses, lifecycle transitions, graph checks and the errors they raise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

INACTIVE = "inactive"
STARTING = "starting"
ACTIVE = "active"
STOPPING = "stopping"
STATUSES = (INACTIVE, STARTING, ACTIVE, STOPPING)

OBJECT_ID = re.compile(r"[0-9a-fA-F]{24}")  # used with fullmatch: "$" lets "\n" through
MAX_NODE_ID_LENGTH = 30


# ----------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: where, what, and the value that was given."""

    path: str
    message: str

    def text(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class FlowError(Exception):
    """A use case refused; ``status`` is the HTTP status the entry point should answer."""

    status = 400

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = tuple(problems)

    def messages(self) -> list[str]:
        return [problem.text() for problem in self.problems] or [self.message]


class InvalidFlow(FlowError):
    status = 400


class FlowNotFound(FlowError):
    status = 404


class Forbidden(FlowError):
    status = 403


class Conflict(FlowError):
    status = 409


class PreconditionFailed(FlowError):
    status = 412


def describe(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of an offending value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ASCII digits only (str.isdigit and int() also take "¹", "٣", "1_0", " 1"); at most 100,
# so that int() stays cheap and never meets its digit limit.
ASCII_NUMBER = re.compile(r"[0-9]{1,100}")
INT64_MAX = 2**63 - 1  # what MongoDB can compare a number with


def parse_number(raw: Any, what: str, minimum: int = 0,
                 maximum: int | None = INT64_MAX) -> int:
    """The one parser of numbers a client writes in a path, a query or a header.

    InvalidFlow (400) names ``what`` when ``raw`` is anything but ASCII digits within
    ``minimum``..``maximum`` (``None``: no upper bound, for values the caller clamps).
    """
    if not isinstance(raw, str) or not ASCII_NUMBER.fullmatch(raw):
        raise InvalidFlow(f"{what}: must be a whole number written in ASCII digits, at most "
                          f"100 of them (got {describe(raw)})")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise InvalidFlow(f"{what}: must be {bound} (got {value})")
    return value


def is_object_id(value: Any) -> bool:
    return isinstance(value, str) and bool(OBJECT_ID.fullmatch(value))


# ----------------------------------------------------------------------------- lifecycle


@dataclass(frozen=True)
class Transition:
    """A status change: from which statuses it is allowed, where it goes, what it announces."""

    name: str
    sources: tuple[str, ...]
    target: str
    event: str | None
    reason: str


START = Transition("start", (INACTIVE,), STARTING, "flow.starting", "start requested")
STOP = Transition("stop", (ACTIVE, STARTING), STOPPING, "flow.stopping", "stop requested")
STARTED = Transition("flow.started", (STARTING,), ACTIVE, None, "orchestrator reported started")
STOPPED = Transition(
    "flow.stopped", (STOPPING, ACTIVE), INACTIVE, None, "orchestrator reported stopped"
)
FAILED = Transition(
    "flow.failed", (STARTING, ACTIVE), STOPPING, "flow.stopping", "orchestrator reported failure"
)
ORPHANED = Transition(
    "orphaned", (STARTING, ACTIVE), STOPPING, "flow.stopping", "all owners were deleted"
)
START_RETRY = Transition(
    "start retry", (STARTING,), STARTING, "flow.starting", "start timed out, command re-sent"
)
START_GIVE_UP = Transition(
    "start give-up", (STARTING,), INACTIVE, "flow.stopping", "start timed out"
)
STOP_RETRY = Transition(
    "stop retry", (STOPPING,), STOPPING, "flow.stopping", "stop timed out, command re-sent"
)
STOP_GIVE_UP = Transition("stop give-up", (STOPPING,), INACTIVE, None, "stop timed out")

STATUS_EVENTS: Mapping[str, Transition] = {
    "flow.started": STARTED,
    "flow.stopped": STOPPED,
    "flow.failed": FAILED,
}


@dataclass(frozen=True)
class Timeouts:
    """How long an orchestrator answer may take before the reconciler steps in."""

    start_seconds: float
    stop_seconds: float

    def plan(self, status: str, retries: int) -> tuple[Transition, float] | None:
        """The reconciler's move for a flow stuck in ``status`` after ``retries`` re-sends."""
        if status == STARTING:
            return (START_RETRY if retries == 0 else START_GIVE_UP), self.start_seconds
        if status == STOPPING:
            return (STOP_RETRY if retries == 0 else STOP_GIVE_UP), self.stop_seconds
        return None


# ----------------------------------------------------------------------------- graph rules


def graph_problems(graph: Mapping[str, Any]) -> list[Problem]:
    """Rules a well-typed graph must also satisfy: unique node ids, edges between known nodes."""
    problems: list[Problem] = []
    nodes = [n for n in _as_list(graph.get("nodes")) if isinstance(n, Mapping)]
    edges = [e for e in _as_list(graph.get("edges")) if isinstance(e, Mapping)]
    if not nodes and isinstance(graph.get("nodes"), list):
        problems.append(Problem("graph.nodes", "a flow needs at least one node"))
    seen: dict[str, int] = {}
    for index, node in enumerate(nodes):
        node_id = node.get("id")
        if not isinstance(node_id, str):
            continue
        if node_id in seen:
            problems.append(
                Problem(
                    f"graph.nodes[{index}].id",
                    f"duplicate node id {describe(node_id)} (also graph.nodes[{seen[node_id]}])",
                )
            )
        else:
            seen[node_id] = index
    if len(nodes) > 1 and not edges:
        problems.append(Problem("graph.edges", "a flow with more than one node needs edges"))
    for index, edge in enumerate(edges):
        for end in ("source", "target"):
            name = edge.get(end)
            if isinstance(name, str) and name not in seen:
                problems.append(
                    Problem(
                        f"graph.edges[{index}].{end}",
                        f"{describe(name)} does not name a node of this flow",
                    )
                )
    return problems


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def with_owner(owners: Iterable[Mapping[str, Any]], owner_id: str, kind: str) -> list[dict]:
    """The owners list with ``owner_id`` added once (as ``kind``) if it is not already there."""
    result = [dict(owner) for owner in owners]
    if not any(owner.get("id") == owner_id for owner in result):
        result.append({"id": owner_id, "type": kind})
    return result


@dataclass
class ListQuery:
    """A validated GET /flows query: paging, filters, sort and literal search text."""

    page_size: int = 10
    page_number: int = 1
    status: str | None = None
    type: str | None = None
    user: str | None = None
    from_template: str | None = None
    search: str | None = None
    sort_field: str = "createdAt"
    sort_descending: bool = False


PUBLIC_FIELDS = (
    "name", "description", "type", "graph", "owners", "tenant", "status", "cron",
    "fromTemplate", "flowSettings", "createdAt", "updatedAt", "revision",
    "statusChangedAt", "statusReason",
)


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds, as JavaScript's Date#toISOString writes it."""
    # isoformat ends a UTC time in "+00:00", which toISOString writes "Z"
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def public_flow(document: Mapping[str, Any]) -> dict[str, Any]:
    """What clients and events see of a stored flow: ``id`` as a string, no internal fields."""
    result: dict[str, Any] = {"id": str(document["_id"])}
    for key in PUBLIC_FIELDS:
        if key in document:
            value = document[key]
            result[key] = iso(value) if isinstance(value, datetime) else value
    return result
