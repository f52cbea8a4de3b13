"""Who is calling: the Principal, its claims, the bearer header, and the identity errors."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

MISSING_HEADER = "Missing authorization header."
INVALID_HEADER = "Invalid authorization header."
INVALID_TOKEN = "Invalid token."
EXPIRED_TOKEN = "Token expired."
IAM_UNAVAILABLE = "IAM is unavailable."

CACHE_MAX_ENTRIES = 10_000
# The permission that makes a caller an administrator, as in OIH's iam-utils.
ADMIN_PERMISSION = "all"


class AuthError(Exception):
    """The caller's credentials are missing or not acceptable (HTTP 401)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class IdentityUnavailable(Exception):
    """The identity provider cannot answer right now; not the caller's fault (HTTP 503)."""

    def __init__(self, message: str = IAM_UNAVAILABLE) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: who they are, which tenant, and what they may do."""

    sub: str
    tenant: str | None
    permissions: frozenset[str]
    is_admin: bool

    def can(self, permission: str) -> bool:
        """True when the caller holds ``permission`` or is an administrator."""
        return self.is_admin or permission in self.permissions

    @property
    def owner_ids(self) -> tuple[str, ...]:
        """Owner ids that make a flow visible to this caller."""
        return (self.sub,) if self.tenant is None else (self.sub, self.tenant)


def _string_list(raw: Any) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        # Some IAMs send OAuth-style scope strings instead of a list.
        return frozenset(raw.replace(",", " ").split())
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return frozenset(item.strip() for item in raw if item.strip())
    raise AuthError("Token permissions are malformed.")


def _permissions_claim(claims: Mapping[str, Any]) -> frozenset[str]:
    """Direct permissions plus those of populated roles, as OIH's IAM resolves them.

    OIH's IAM adds the permissions of an account's roles to ``permissions`` before it
    answers; a role that arrives populated (an object with ``permissions``) is added here
    too, so a token whose roles were not yet folded in still grants them. A role given
    only by its id carries nothing to add.
    """
    permissions = _string_list(claims.get("permissions"))
    roles = claims.get("roles")
    if isinstance(roles, list):
        for role in roles:
            if isinstance(role, Mapping):
                permissions |= _string_list(role.get("permissions"))
    return permissions


def _tenant_claim(claims: Mapping[str, Any]) -> str | None:
    raw = claims.get("tenant")
    if raw is None or raw == "":
        memberships = claims.get("memberships")
        if isinstance(memberships, list):
            entries = [entry for entry in memberships if isinstance(entry, Mapping)]
            # iam-utils takes the active membership as the caller's context; a sole
            # membership counts too. With several and none active the tenant is ambiguous.
            active = [entry for entry in entries if entry.get("active") is True]
            chosen = active[:1] or (entries if len(entries) == 1 else [])
            if chosen:
                raw = chosen[0].get("tenant")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise AuthError("Token tenant is malformed.")
    return raw


def _subject_claim(claims: Mapping[str, Any]) -> str:
    # OIH's IAM answers basic introspection with the account document, whose id is
    # ``_id``; iam-utils uses ``sub`` when present and ``_id`` otherwise.
    for name in ("sub", "_id"):
        raw = claims.get(name)
        if raw is not None and raw != "":
            if not isinstance(raw, str) or not raw.strip():
                raise AuthError("Token subject is malformed.")
            return raw
    raise AuthError("Token has no subject.")


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Build a Principal from verified token claims (OIH IAM account document, OIDC or JWT).

    The rule follows OIH's lib/iam-utils: nested ``claims`` override the top level; the
    subject is ``sub``, else ``_id``; the tenant is ``tenant``, else the active (or only)
    membership's; permissions are ``permissions`` plus those of populated ``roles``; the
    caller is an administrator exactly when its permissions include ``all``.
    """
    nested = claims.get("claims")
    if isinstance(nested, Mapping):
        claims = {**claims, **nested}
    permissions = _permissions_claim(claims)
    return Principal(
        sub=_subject_claim(claims),
        tenant=_tenant_claim(claims),
        permissions=permissions,
        is_admin=ADMIN_PERMISSION in permissions,
    )


def bearer_token(header_value: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header value."""
    if header_value is None or not header_value.strip():
        raise AuthError(MISSING_HEADER)
    parts = header_value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError(INVALID_HEADER)
    return parts[1]


class Authenticator(Protocol):
    """Anything that can turn a bearer token into a Principal."""

    def authenticate(self, token: str) -> Principal: ...


class TtlCache:
    """Bounded, thread-safe map whose entries expire after one fixed TTL."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any | None:
        if self._ttl <= 0:
            return None
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            deadline, value = entry
            if deadline <= now:
                del self._entries[key]
                return None
            return value

    def put(self, key: str, value: Any) -> None:
        if self._ttl <= 0:
            return
        now = self._clock()
        with self._lock:
            self._entries.pop(key, None)
            # Every entry has the same TTL, so insertion order is expiry order and the
            # front is both the oldest and the first to expire: eviction stays O(1).
            while self._entries:
                deadline, _ = next(iter(self._entries.values()))
                if deadline > now and len(self._entries) < self._max_entries:
                    break
                self._entries.popitem(last=False)
            self._entries[key] = (now + self._ttl, value)

