"""Identity: turns a bearer token into a Principal by the configured mode (IAM, JWT, dev)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt
import requests

from flow_repository.settings import Settings, SettingsError

from .dev_tokens import dev_secret, mint_token
from .introspection import IntrospectionAuthenticator
from .jwt_tokens import JwtAuthenticator
from .principal import (
    Authenticator,
    AuthError,
    IdentityUnavailable,
    Principal,
    bearer_token,
    principal_from_claims,
)

__all__ = [
    "AuthError",
    "Authenticator",
    "IdentityUnavailable",
    "IntrospectionAuthenticator",
    "JwtAuthenticator",
    "Principal",
    "bearer_token",
    "build_authenticator",
    "dev_secret",
    "mint_token",
    "principal_from_claims",
]


def build_authenticator(
    settings: Settings,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Authenticator:
    """The authenticator for ``settings.auth_mode`` (basic, oidc, jwt or dev)."""
    mode = settings.auth_mode
    if mode in ("basic", "oidc"):
        return IntrospectionAuthenticator(settings, session=session, clock=clock)
    if mode == "jwt":
        jwks_client = None
        if settings.jwt_jwks_url:
            try:
                jwks_client = jwt.PyJWKClient(
                    settings.jwt_jwks_url, timeout=settings.iam_timeout_seconds
                )
            except jwt.PyJWKClientError:
                raise SettingsError("JWT_JWKS_URL must be an http or https URL") from None
        return JwtAuthenticator(
            secret=settings.jwt_secret,
            public_key=settings.jwt_public_key,
            jwks_client=jwks_client,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    if mode == "dev":
        return JwtAuthenticator(
            secret=dev_secret(settings),
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            hmac_algorithms=frozenset({"HS256"}),
        )
    raise SettingsError(f"unknown auth mode {mode!r}")

