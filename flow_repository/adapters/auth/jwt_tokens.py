"""Local JWT verification with PyJWT: HMAC secret, public key or JWKS endpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from flow_repository.settings import SettingsError

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

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_EC_ALGORITHMS = frozenset(_EC_ALGORITHM_BY_CURVE.values())
_ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | _EC_ALGORITHMS | {"EdDSA"}
_JWK_ALGORITHMS = {"RSA": _RSA_ALGORITHMS, "EC": _EC_ALGORITHMS, "OKP": frozenset({"EdDSA"})}

# iat/nbf come from the issuer's clock; tolerate that much skew so a fresh token is not refused.
_CLOCK_SKEW_SECONDS = 60.0


def _public_key(pem: str) -> tuple[Any, frozenset[str]]:
    """Load a PEM public key or certificate and the JWS algorithms that fit it."""
    text = pem.strip()
    # Environment variables often carry PEM with literal "\n" sequences instead of newlines.
    if "\\n" in text and "\n" not in text:
        text = text.replace("\\n", "\n")
    data = text.encode("ascii", errors="replace")
    try:
        if b"BEGIN CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SettingsError("JWT_PUBLIC_KEY is not a PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHM_BY_CURVE:
        return key, frozenset({_EC_ALGORITHM_BY_CURVE[key.curve.name]})
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key, frozenset({"EdDSA"})
    raise SettingsError("JWT_PUBLIC_KEY uses an unsupported key type")


class JwtAuthenticator:
    """Verifies JWTs locally with a shared secret, a public key or a JWKS endpoint."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        jwks_client: jwt.PyJWKClient | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        hmac_algorithms: frozenset[str] = _HMAC_ALGORITHMS,
    ) -> None:
        if not (secret or public_key or jwks_client):
            raise SettingsError("JWT verification needs a secret, a public key or a JWKS URL")
        self._secret = secret or None
        self._hmac_algorithms = hmac_algorithms if secret else frozenset()
        self._public_key, self._public_algorithms = (
            _public_key(public_key) if public_key else (None, frozenset())
        )
        self._jwks = jwks_client
        self._audience = audience or None
        self._issuer = issuer or None
        # Tokens verified with the secret or the public key, with their exp: a repeated token
        # is then not decoded again (that cost a third of a read). JWKS keys can be withdrawn,
        # so tokens verified with one are always checked afresh.
        self._verified = TtlCache(60.0, CACHE_MAX_ENTRIES, time.monotonic)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The JWS algorithms a token may be signed with (the start-up log names them)."""
        names = set(self._hmac_algorithms) | set(self._public_algorithms)
        if self._jwks is not None:
            names |= _ASYMMETRIC_ALGORITHMS
        return tuple(sorted(names))

    def authenticate(self, token: str) -> Principal:
        """The Principal for a verified ``token``; AuthError otherwise."""
        if not token:
            raise AuthError(INVALID_TOKEN)
        verified = self._verified.get(token)
        # The expiry test PyJWT applies (exp > now); a token that expired is verified again,
        # which raises as before.
        if verified is not None and verified[0] > time.time():
            return verified[1]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(INVALID_TOKEN) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise AuthError(INVALID_TOKEN)
        key = self._key_for(algorithm, header)
        try:
            claims = jwt.decode(
                token,
                key,
                # Exactly the header's algorithm, and only after _key_for accepted it for
                # this key: that rules out "none" and HS/RS key confusion.
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp"],
                    "verify_aud": self._audience is not None,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(EXPIRED_TOKEN) from None
        except jwt.PyJWTError:
            raise AuthError(INVALID_TOKEN) from None
        self._check_not_before(claims)
        principal = principal_from_claims(claims)
        if algorithm in self._hmac_algorithms or algorithm in self._public_algorithms:
            self._verified.put(token, (int(claims["exp"]), principal))
        return principal

    @staticmethod
    def _check_not_before(claims: Mapping[str, Any]) -> None:
        # Checked here rather than by PyJWT so skew tolerance does not also stretch exp.
        nbf = claims.get("nbf")
        if nbf is None:
            return
        if isinstance(nbf, bool) or not isinstance(nbf, (int, float)):
            raise AuthError(INVALID_TOKEN)
        if nbf > time.time() + _CLOCK_SKEW_SECONDS:
            raise AuthError(INVALID_TOKEN)

    def _key_for(self, algorithm: str, header: Mapping[str, Any]) -> Any:
        if algorithm in self._hmac_algorithms:
            return self._secret
        if algorithm in self._public_algorithms:
            return self._public_key
        if self._jwks is not None and algorithm in _ASYMMETRIC_ALGORITHMS:
            return self._jwks_key(self._jwks, algorithm, header)
        raise AuthError(INVALID_TOKEN)

    @staticmethod
    def _jwks_key(client: jwt.PyJWKClient, algorithm: str, header: Mapping[str, Any]) -> Any:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(INVALID_TOKEN)
        try:
            # Fetch (or reuse) the key set first, so a broken endpoint reads as an outage
            # and only an unknown kid reads as a bad token.
            client.get_signing_keys()
        except jwt.PyJWTError as error:
            _log.warning("JWKS fetch failed: %s", type(error).__name__)
            raise IdentityUnavailable(IAM_UNAVAILABLE) from None
        try:
            jwk = client.get_signing_key(kid)
        except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError) as error:
            _log.warning("JWKS refresh failed: %s", type(error).__name__)
            raise IdentityUnavailable(IAM_UNAVAILABLE) from None
        except jwt.PyJWTError:
            raise AuthError(INVALID_TOKEN) from None
        # A symmetric ("oct") key published in a JWKS is public, so it must never verify anything.
        if algorithm not in _JWK_ALGORITHMS.get(jwk.key_type or "", frozenset()):
            raise AuthError(INVALID_TOKEN)
        return jwk.key

