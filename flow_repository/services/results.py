"""What the use cases return: saved flows, bulk item outcomes, dry runs, and their checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flow_repository.adapters.references import ReferencesUnavailable
from flow_repository.domain.flow import FlowError

T = TypeVar("T")


class InvalidEvent(ValueError):
    """A broker message the service can never apply (dead-lettered, not retried)."""



@dataclass(frozen=True)
class Saved:
    """A flow as written, and the unknown fields that were dropped from the request."""

    flow: dict[str, Any]
    ignored_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shown:
    """One flow as read for an answer: its revision, and its public form as the JSON text
    (:func:`~flow_repository.contract.json_text`) the answer holds."""

    revision: int
    encoded: str


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item of a bulk request: what it wrote, or why it failed."""

    status: int
    index: int
    data: Mapping[str, Any] | None = None
    errors: Sequence[str] = ()
    ignored_fields: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        return self.status < 300



@dataclass
class Checks:
    """Runs the checks of a change. A real change stops at the first refusal (it raises);
    a dry run (``dry_run=True``) runs them all and collects every refusal as a problem,
    with the status the real call would answer, and unreachable services as warnings."""

    dry_run: bool = False
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def run(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``check(*args, **kwargs)``; in a dry run, None when it refused."""
        if not self.dry_run:
            return check(*args, **kwargs)
        try:
            return check(*args, **kwargs)
        except ReferencesUnavailable as error:
            self.warnings.extend(error.messages())
        except FlowError as error:
            self.problems.extend({"message": message, "code": error.status}
                                 for message in error.messages())
        return None


@dataclass(frozen=True)
class DryRun:
    """What a dry run found: the flow as it would be stored (None when it is not valid)."""

    flow: Mapping[str, Any] | None
    problems: Sequence[Mapping[str, Any]]
    warnings: Sequence[str]
    ignored_fields: Sequence[str] = ()

    def meta(self) -> dict[str, Any]:
        return {"dryRun": True, "valid": not self.problems, "problems": list(self.problems),
                "warnings": list(self.warnings), "ignoredFields": list(self.ignored_fields)}
