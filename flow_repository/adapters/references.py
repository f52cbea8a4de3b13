"""Optional checks that a flow's references exist: components, secrets and its template."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import requests

from flow_repository.adapters.auth.principal import TtlCache
from flow_repository.domain.flow import FlowError, InvalidFlow, Problem
from flow_repository.settings import Settings

CACHE_MAX_ENTRIES = 10_000
# Answers meaning "this caller cannot see it": the reference is missing for this caller.
NOT_VISIBLE = (401, 403, 404)


class ReferencesUnavailable(FlowError):
    """A reference service could not answer; the change cannot be checked right now."""

    status = 503


@dataclass(frozen=True)
class Reference:
    """One id a flow names in another OIH service, and where in the flow it is named."""

    kind: str  # component, secret or template
    id: str
    path: str
    node: str | None


def references_of(flow: Mapping[str, Any]) -> Iterator[Reference]:
    """Every component, secret and template id a (validated) flow names."""
    graph = flow.get("graph") or {}
    for index, node in enumerate(graph.get("nodes") or []):
        node_id = node.get("id")
        if node.get("componentId"):
            yield Reference("component", node["componentId"],
                            f"graph.nodes[{index}].componentId", node_id)
        if node.get("credentials_id"):
            yield Reference("secret", node["credentials_id"],
                            f"graph.nodes[{index}].credentials_id", node_id)
    if flow.get("fromTemplate"):
        yield Reference("template", flow["fromTemplate"], "fromTemplate", None)


class ReferenceChecker:
    """Asks the configured OIH services, with the caller's token, whether references exist.

    A kind is checked only when its service URL is set. Positive answers are cached for
    ``REFERENCE_CACHE_SECONDS`` per caller token (visibility differs between callers);
    negative ones never are, so a component created a moment later is found at once.
    """

    def __init__(self, settings: Settings, *, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._routes = {
            kind: f"{base.rstrip('/')}/{collection}/"
            for kind, base, collection in (
                ("component", settings.component_repository_url, "components"),
                ("secret", settings.secret_service_url, "secrets"),
                ("template", settings.template_repository_url, "templates"),
            )
            if base
        }
        self._timeout = settings.reference_timeout_seconds
        self._session = session or requests.Session()
        self._cache = TtlCache(settings.reference_cache_seconds, CACHE_MAX_ENTRIES, clock)

    @property
    def enabled(self) -> bool:
        return bool(self._routes)

    def check(self, token: str | None, flow: Mapping[str, Any]) -> None:
        """Raise InvalidFlow naming every missing reference, or ReferencesUnavailable."""
        if not self._routes:
            return
        problems: list[Problem] = []
        unavailable: list[str] = []
        answers: dict[tuple[str, str], bool | None] = {}
        for reference in references_of(flow):
            if reference.kind not in self._routes:
                continue
            key = (reference.kind, reference.id)
            if key not in answers:
                answers[key] = self._exists(token, reference.kind, reference.id)
            if answers[key] is None:
                unavailable.append(f"{reference.kind} {reference.id}")
            elif not answers[key]:
                where = f" (node {reference.node!r})" if reference.node is not None else ""
                problems.append(Problem(reference.path, f"{reference.kind} {reference.id}"
                                        f"{where} does not exist or is not visible to you"))
        if problems:
            raise InvalidFlow("the flow names missing references", problems)
        if unavailable:
            raise ReferencesUnavailable(
                "cannot check references right now (service unreachable): "
                + ", ".join(sorted(set(unavailable))))

    def _exists(self, token: str | None, kind: str, reference_id: str) -> bool | None:
        """True, False (missing or not visible), or None when the service did not answer."""
        digest = hashlib.sha256((token or "").encode()).hexdigest()
        cache_key = f"{kind}:{reference_id}:{digest}"
        if self._cache.get(cache_key):
            return True
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            answer = self._session.get(self._routes[kind] + reference_id, headers=headers,
                                       timeout=self._timeout)
        except requests.RequestException:
            return None
        if answer.status_code in NOT_VISIBLE:
            return False
        if not 200 <= answer.status_code < 300:
            return None
        self._cache.put(cache_key, True)
        return True
