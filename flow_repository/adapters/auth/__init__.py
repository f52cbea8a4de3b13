"""Identity: turns a bearer token into a Principal by the configured mode (IAM, JWT, dev)."""

from __future__ import annotations

import logging
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

_log = logging.getLogger(__name__)

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


DEV_TOKENS_REFUSED = (
    "MONGODB_URL is set (production) but no identity is configured: set IAM introspection "
    "(INTROSPECT_TYPE with INTROSPECT_ENDPOINT_BASIC and IAM_TOKEN, or INTROSPECT_ENDPOINT_OIDC "
    "with OIDC_CLIENT_ID and OIDC_CLIENT_SECRET) or JWT verification (JWT_SECRET, "
    "JWT_PUBLIC_KEY or JWT_JWKS_URL); DEV_TOKENS=allow accepts development tokens instead")


def build_authenticator(
    settings: Settings,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Authenticator:
    """The authenticator for ``settings.auth_mode`` (basic, oidc, jwt or dev); logs which."""
    mode = settings.auth_mode
    if mode in ("basic", "oidc"):
        endpoint = (settings.introspect_endpoint_basic if mode == "basic"
                    else settings.introspect_endpoint_oidc)
        _log.info(f"identity mode: IAM introspection ({mode})",
                  extra={"identityMode": f"introspection-{mode}", "endpoint": endpoint})
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
        verifier = JwtAuthenticator(
            secret=settings.jwt_secret,
            public_key=settings.jwt_public_key,
            jwks_client=jwks_client,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
        keys = "JWKS URL" if jwks_client else "public key" if settings.jwt_public_key else "secret"
        _log.info(f"identity mode: local JWT verification with a {keys} "
                  f"({', '.join(verifier.algorithms)})",
                  extra={"identityMode": "jwt", "algorithms": list(verifier.algorithms)})
        return verifier
    if mode == "dev":
        if not settings.dev_tokens_allowed:
            raise SettingsError(DEV_TOKENS_REFUSED)
        verifier = JwtAuthenticator(
            secret=dev_secret(settings),
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            hmac_algorithms=frozenset({"HS256"}),
        )
        _log.warning("identity mode: development tokens (HS256, local secret file). "
                     "NOT FOR PRODUCTION: configure IAM introspection or JWT verification.",
                     extra={"identityMode": "dev", "algorithms": ["HS256"]})
        return verifier
    raise SettingsError(f"unknown auth mode {mode!r}")

