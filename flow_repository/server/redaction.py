"""Credentials out of log lines: query parameters, Authorization values and URL userinfo."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
# Names whose values are credentials, in a query string, a form or ``name=value`` text.
SECRET_NAMES = ("access_token", "id_token", "refresh_token", "token", "api_key", "apikey",
                "password", "passwd", "secret", "client_secret")
_SECRET_PARAMETER = re.compile(
    r"(?i)(?<![A-Za-z0-9])((?:" + "|".join(SECRET_NAMES) + r")(?:%3D|=))[^&\s\"',;]*")
# "Bearer <8 or more characters>" anywhere (prose such as "bearer token" keeps its words), and
# whatever follows an Authorization header name, Basic credentials included.
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/\-]{8,}=*")
_AUTHORIZATION = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?!\[redacted\])"
                            r"(?:(?:bearer|basic)\s+)?[^\s\"',;]+")
# scheme://user:password@host and scheme://token@host
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/@\s:\"']*)(:[^/@\s\"']*)?@")
# Keys whose values are credentials wherever they appear in structured log fields.
SECRET_KEYS = frozenset({*SECRET_NAMES, "authorization", "iam_token", "queue_url",
                         "mongodb_url", "cookie"})


def _userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match.groups()
    if password is None:
        return f"{scheme}{REDACTED}@"  # a lone userinfo is usually a token
    return f"{scheme}{user}:{REDACTED}@"


def redact(text: str) -> str:
    """``text`` with every credential it holds replaced by ``[redacted]``."""
    if not text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    text = _SECRET_PARAMETER.sub(lambda match: match.group(1) + REDACTED, text)
    text = _AUTHORIZATION.sub(lambda match: match.group(1) + REDACTED, text)
    return _SCHEME_CREDENTIAL.sub(lambda match: match.group(1) + match.group(2) + REDACTED,
                                  text)


def redact_value(value: Any, key: str | None = None) -> Any:
    """A structured log field with credentials redacted, by key and inside every string."""
    if key is not None and key.lower() in SECRET_KEYS and value is not None:
        if isinstance(value, str) and "://" in value:
            return redact(value)  # a URL stays useful with its password gone
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {name: redact_value(item, str(name)) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return value
