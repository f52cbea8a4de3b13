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


def _permissions_claim(raw: Any) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        # Some IAMs send OAuth-style scope strings instead of a list.
        return frozenset(raw.replace(",", " ").split())
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return frozenset(item.strip() for item in raw if item.strip())
    raise AuthError("Token permissions are malformed.")


def _tenant_claim(claims: Mapping[str, Any]) -> str | None:
    raw = claims.get("tenant")
    if raw is None or raw == "":
        memberships = claims.get("memberships")
        # With several memberships the tenant is ambiguous, so the caller gets none.
        if (
            isinstance(memberships, list)
            and len(memberships) == 1
            and isinstance(memberships[0], Mapping)
        ):
            raw = memberships[0].get("tenant")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise AuthError("Token tenant is malformed.")
    return raw


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Build a Principal from verified token claims (OIH IAM or JWT shape)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise AuthError("Token has no subject.")
    permissions = _permissions_claim(claims.get("permissions"))
    return Principal(
        sub=sub,
        tenant=_tenant_claim(claims),
        permissions=permissions,
        is_admin="all" in permissions or claims.get("isAdmin") is True,
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

