"""IAM token introspection (OIH basic or OIDC), with a short-lived answer cache."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests

from flow_repository.settings import Settings, SettingsError

from .principal import (
    CACHE_MAX_ENTRIES,
    EXPIRED_TOKEN,
    IAM_UNAVAILABLE,
    INVALID_TOKEN,
    AuthError,
    IdentityUnavailable,
    Principal,
    TtlCache,
    principal_from_claims,
)

_log = logging.getLogger(__name__)


def _expiry(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


class IntrospectionAuthenticator:
    """Asks the IAM introspection endpoint about each token, caching the answers briefly."""

    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self._kind = settings.auth_mode
        if self._kind == "basic":
            endpoint = settings.introspect_endpoint_basic
            variable = "INTROSPECT_ENDPOINT_BASIC"
        elif self._kind == "oidc":
            endpoint = settings.introspect_endpoint_oidc
            variable = "INTROSPECT_ENDPOINT_OIDC"
        else:
            raise SettingsError(f"introspection is not configured (auth mode {self._kind})")
        if not endpoint:
            raise SettingsError(f"{variable} is required for {self._kind} introspection")
        self._endpoint = endpoint
        self._iam_token = settings.iam_token
        self._client_auth = (
            (settings.oidc_client_id, settings.oidc_client_secret)
            if settings.oidc_client_id and settings.oidc_client_secret
            else None
        )
        self._timeout = settings.iam_timeout_seconds
        self._session = session if session is not None else requests.Session()
        self._wall_clock = wall_clock
        self._cache = TtlCache(settings.iam_token_cache_ttl, max_entries, clock)

    def authenticate(self, token: str) -> Principal:
        """The Principal for ``token``; AuthError if IAM rejects it."""
        if not token:
            raise AuthError(INVALID_TOKEN)
        # The digest keeps raw tokens out of memory dumps of the cache.
        key = hashlib.sha256(token.encode("utf-8")).hexdigest()
        cached = self._cache.get(key)
        if cached is not None:
            principal, exp = cached
            self._check_expiry(exp)
            return principal
        claims = self._introspect(token)
        exp = _expiry(claims)
        self._check_expiry(exp)
        principal = principal_from_claims(claims)
        self._cache.put(key, (principal, exp))
        return principal

    def _check_expiry(self, exp: float | None) -> None:
        if exp is not None and exp <= self._wall_clock():
            raise AuthError(EXPIRED_TOKEN)

    def _send(self, token: str) -> requests.Response:
        if self._kind == "basic":
            headers = {"x-auth-type": "basic"}
            if self._iam_token:
                headers["authorization"] = f"Bearer {self._iam_token}"
            return self._session.post(
                self._endpoint, json={"token": token}, headers=headers, timeout=self._timeout
            )
        return self._session.post(
            self._endpoint,
            data={"token": token},
            auth=self._client_auth,
            headers={"accept": "application/json"},
            timeout=self._timeout,
        )

    def _introspect(self, token: str) -> dict[str, Any]:
        try:
            response = self._send(token)
        except requests.RequestException as error:
            _log.warning("IAM introspection failed: %s", type(error).__name__)
            raise IdentityUnavailable(IAM_UNAVAILABLE) from None
        status = response.status_code
        if status in (400, 401, 403, 404):
            _log.debug("IAM rejected a token with HTTP %s", status)
            raise AuthError(INVALID_TOKEN)
        if status != 200:
            _log.warning("IAM introspection answered HTTP %s", status)
            raise IdentityUnavailable(IAM_UNAVAILABLE)
        try:
            claims = response.json()
        except ValueError:
            _log.warning("IAM introspection answered with a body that is not JSON")
            raise IdentityUnavailable(IAM_UNAVAILABLE) from None
        if not isinstance(claims, dict):
            _log.warning("IAM introspection answered with JSON that is not an object")
            raise IdentityUnavailable(IAM_UNAVAILABLE)
        active = claims.get("active")
        # RFC 7662 demands an explicit true; OIH basic introspection omits the field.
        if active is False or (self._kind == "oidc" and active is not True):
            raise AuthError(INVALID_TOKEN)
        return claims

