"""Identity: turns a bearer token into a Principal via IAM introspection or local JWT checks."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from flow_repository.settings import Settings, SettingsError

_log = logging.getLogger(__name__)

MISSING_HEADER = "Missing authorization header."
INVALID_HEADER = "Invalid authorization header."
INVALID_TOKEN = "Invalid token."
EXPIRED_TOKEN = "Token expired."
IAM_UNAVAILABLE = "IAM is unavailable."

CACHE_MAX_ENTRIES = 10_000

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_EC_ALGORITHMS = frozenset(_EC_ALGORITHM_BY_CURVE.values())
_ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | _EC_ALGORITHMS | {"EdDSA"}
_JWK_ALGORITHMS = {"RSA": _RSA_ALGORITHMS, "EC": _EC_ALGORITHMS, "OKP": frozenset({"EdDSA"})}

# iat/nbf come from the issuer's clock; tolerate that much skew so a fresh token is not refused.
_CLOCK_SKEW_SECONDS = 60.0


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


class _TtlCache:
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
        self._cache = _TtlCache(settings.iam_token_cache_ttl, max_entries, clock)

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
        self._verified = _TtlCache(60.0, CACHE_MAX_ENTRIES, time.monotonic)

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


def _user_id() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else getpass.getuser()


def _state_home() -> Path:
    configured = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says relative paths are invalid and must be ignored.
    if configured and os.path.isabs(configured):
        return Path(configured)
    return Path.home() / ".local" / "state"


def _read_secret(path: Path, private_only: bool) -> str | None:
    """The file's stripped content, or None when it does not exist."""
    flags = os.O_RDONLY
    if private_only:
        # In a shared directory another user could plant a symlink or a file of their own.
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        if private_only and hasattr(os, "getuid"):
            status = os.fstat(handle.fileno())
            if status.st_uid != os.getuid() or status.st_mode & 0o077:
                raise PermissionError(f"{path} is not private to this user; remove it")
        return handle.read().strip()


def _create_secret(path: Path) -> None:
    """Create ``path`` holding a fresh secret unless some other process got there first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # A hard link appears complete and never replaces an existing file, so the
            # first of several racing processes wins and the others read its secret.
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError:
            _create_exclusive(path, secret)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _create_exclusive(path: Path, secret: str) -> None:
    # For filesystems without hard links; O_EXCL still lets only one process create it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")


def _load_or_create_secret(path: Path, private_only: bool = False) -> str:
    for _ in range(40):
        secret = _read_secret(path, private_only)
        if secret is None:
            _create_secret(path)
        elif secret:
            return secret
        else:
            # Empty: another process made it with O_EXCL and is still writing.
            time.sleep(0.05)
    raise RuntimeError(f"dev token secret file {path} is empty; delete it to make a new one")


def dev_secret(settings: Settings) -> str:
    """The HS256 secret for local development tokens, created on first use."""
    if settings.dev_token_secret_file:
        # An explicitly configured file must not be silently swapped for another one.
        return _load_or_create_secret(Path(settings.dev_token_secret_file).expanduser())
    try:
        primary: Path | None = _state_home() / "flow-repository" / "dev-token-secret"
    except RuntimeError:
        primary = None  # no home directory to be found
    if primary is not None:
        try:
            return _load_or_create_secret(primary)
        except OSError as error:
            _log.warning(
                "cannot use %s (%s); using the temp directory", primary, type(error).__name__
            )
    fallback = Path(tempfile.gettempdir()) / f"flow-repository-dev-token-secret-{_user_id()}"
    return _load_or_create_secret(fallback, private_only=True)


def mint_token(
    settings: Settings,
    sub: str,
    tenant: str | None,
    permissions: Sequence[str],
    ttl_seconds: int = 3600,
) -> str:
    """An HS256 token the configured dev/JWT-secret authenticator accepts."""
    if not sub:
        raise ValueError("sub must be a non-empty string")
    if isinstance(permissions, str):
        raise TypeError("permissions must be a sequence of strings, not one string")
    if settings.jwt_secret:
        secret = settings.jwt_secret
    elif settings.auth_mode == "jwt":
        raise ValueError(
            "JWT verification uses a public key or JWKS; only the holder of the private key "
            "can issue tokens"
        )
    elif settings.auth_mode in ("basic", "oidc"):
        raise ValueError("tokens come from IAM when introspection is configured")
    else:
        secret = dev_secret(settings)
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "permissions": list(permissions),
        "iat": now,
        "exp": now + int(ttl_seconds),
    }
    if tenant:
        claims["tenant"] = tenant
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, secret, algorithm="HS256")
