"""Pure ownership rule: which changes to a flow's owners a caller may make (issue 9).

Policy ``strict`` (the default): a caller that is not an administrator may add as owners only
itself (type ``user``) and its own tenant (type ``tenant``), and may remove only itself; every
other stored owner, the flow's tenant among them, stays. Repeating the stored owners
unchanged is always fine (OIH clients send back what they read). Policy ``oih`` keeps OIH's
permissive behaviour: any owners a client sends are taken. Administrators are unrestricted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flow_repository.domain.flow import Problem, describe

STRICT = "strict"
OIH = "oih"


def _key(owner: Mapping[str, Any]) -> tuple[Any, Any]:
    return owner.get("id"), owner.get("type")


def owner_change_problems(
    requested: Iterable[Mapping[str, Any]],
    stored: Iterable[Mapping[str, Any]],
    *,
    sub: str,
    tenant: str | None,
    is_admin: bool,
    policy: str = STRICT,
) -> list[Problem]:
    """What is wrong with replacing ``stored`` owners by ``requested`` (empty when allowed).

    On create, ``stored`` is empty. Each problem names the owner entry at fault.
    """
    if is_admin or policy == OIH:
        return []
    requested = list(requested)
    stored = list(stored)
    stored_keys = {_key(owner) for owner in stored}
    requested_keys = {_key(owner) for owner in requested}
    own = {(sub, "user")} | ({(tenant, "tenant")} if tenant else set())
    problems = [
        Problem(f"owners[{index}]",
                f"may not add owner {describe(dict(owner))}: a caller may add only itself "
                f"(type user) and its own tenant (type tenant)")
        for index, owner in enumerate(requested)
        if _key(owner) not in stored_keys and _key(owner) not in own
    ]
    problems.extend(
        Problem("owners",
                f"may not remove owner {describe(dict(owner))}: a caller may remove only itself")
        for owner in stored
        if _key(owner) not in requested_keys and _key(owner) != (sub, "user")
    )
    return problems
