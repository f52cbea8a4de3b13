"""Development tokens: the local HS256 secret file and ``mint_token``."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from flow_repository.settings import Settings, SettingsError, state_home

_log = logging.getLogger(__name__)


def _user_id() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else getpass.getuser()


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
        if hasattr(os, "getuid"):
            _check_private(path, os.fstat(handle.fileno()), private_only)
        return handle.read().strip()


def _check_private(path: Path, status: os.stat_result, private_only: bool) -> None:
    """Refuse a secret someone else could have written (and so could forge tokens with)."""
    if status.st_uid != os.getuid():
        raise SettingsError(f"dev token secret file {path} is owned by user id "
                            f"{status.st_uid}, not by this user ({os.getuid()}); refusing it")
    if status.st_mode & 0o022:
        raise SettingsError(f"dev token secret file {path} is writable by group or others "
                            f"(mode {stat.filemode(status.st_mode)}); run chmod go-w on it "
                            "or remove it")
    if private_only and status.st_mode & 0o077:
        raise PermissionError(f"{path} is not private to this user; remove it")


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
        primary: Path | None = state_home() / "flow-repository" / "dev-token-secret"
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
