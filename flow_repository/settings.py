"""The one frozen Settings object, read from OIH-compatible environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY_DATABASE = ":memory:"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def state_home() -> Path:
    """The user's state directory: $XDG_STATE_HOME when it is absolute, else
    ~/.local/state (the XDG spec says relative paths are invalid and must be ignored)."""
    configured = os.environ.get("XDG_STATE_HOME", "")
    if configured and os.path.isabs(configured):
        return Path(configured)
    return Path.home() / ".local" / "state"


def _text(raw: str) -> str | None:
    value = raw.strip()
    return value or None


def _integer(raw: str) -> int:
    return int(raw.strip())


def _number(raw: str) -> float:
    return float(raw.strip())


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _lower(raw: str) -> str:
    return raw.strip().lower()


def _names(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _setting(env: str, default: Any, parse: Callable[[str], Any] = _text) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; field metadata names the environment variable."""

    port: int = _setting("PORT", 3001, _integer)
    mongodb_url: str | None = _setting("MONGODB_URL", None)
    mongodb_timeout_ms: int = _setting("MONGODB_TIMEOUT_MS", 5000, _integer)
    # Without MONGODB_URL: the SQLite file of the embedded store (default: under the state
    # directory, see embedded_database); ":memory:" keeps nothing.
    embedded_db_path: str | None = _setting("EMBEDDED_DB_PATH", None)
    queue_url: str = _setting("QUEUE_URL", "amqp://guest:guest@localhost:5672")
    event_exchange: str = _setting("EVENT_EXCHANGE", "event-bus")
    event_queue: str = _setting("EVENT_QUEUE", "flow-repository")
    event_queue_type: str = _setting("EVENT_QUEUE_TYPE", "classic", _lower)

    introspect_type: str | None = _setting("INTROSPECT_TYPE", None)
    introspect_endpoint_basic: str | None = _setting("INTROSPECT_ENDPOINT_BASIC", None)
    introspect_endpoint_oidc: str | None = _setting("INTROSPECT_ENDPOINT_OIDC", None)
    iam_token: str | None = _setting("IAM_TOKEN", None)
    oidc_client_id: str | None = _setting("OIDC_CLIENT_ID", None)
    oidc_client_secret: str | None = _setting("OIDC_CLIENT_SECRET", None)
    iam_token_cache_ttl: float = _setting("IAM_TOKEN_CACHE_TTL", 60.0, _number)
    iam_timeout_seconds: float = _setting("IAM_TIMEOUT_SECONDS", 5.0, _number)
    jwt_secret: str | None = _setting("JWT_SECRET", None)
    jwt_public_key: str | None = _setting("JWT_PUBLIC_KEY", None)
    jwt_jwks_url: str | None = _setting("JWT_JWKS_URL", None)
    jwt_audience: str | None = _setting("JWT_AUDIENCE", None)
    jwt_issuer: str | None = _setting("JWT_ISSUER", None)
    dev_token_secret_file: str | None = _setting("DEV_TOKEN_SECRET_FILE", None)

    flow_read_permission: str = _setting("FLOW_READ_PERMISSION", "flows.read")
    flow_write_permission: str = _setting("FLOW_WRITE_PERMISSION", "flows.write")
    flow_control_permission: str = _setting("FLOW_CONTROL_PERMISSION", "flows.control")
    flow_bulk_permission: str = _setting("FLOW_BULK_PERMISSION", "flows.bulk")
    origin_whitelist: tuple[str, ...] = _setting("ORIGINWHITELIST", (), _names)
    ownership_policy: str = _setting("OWNERSHIP_POLICY", "strict", lambda raw: raw.strip().lower())

    max_body_bytes: int = _setting("MAX_BODY_BYTES", 1024 * 1024, _integer)
    max_page_size: int = _setting("MAX_PAGE_SIZE", 1000, _integer)
    logging_service_base_url: str | None = _setting("LOGGING_SERVICE_BASE_URL", None)
    logging_service_timeout_seconds: float = _setting("LOGGING_SERVICE_TIMEOUT_SECONDS",
                                                      10.0, _number)
    bulk_max_items: int = _setting("BULK_MAX_ITEMS", 100, _integer)
    max_list_bytes: int = _setting("MAX_LIST_BYTES", 4 * 1024 * 1024, _integer)

    history_max_revisions: int = _setting("HISTORY_MAX_REVISIONS", 100, _integer)
    component_repository_url: str | None = _setting("COMPONENT_REPOSITORY_URL", None)
    secret_service_url: str | None = _setting("SECRET_SERVICE_URL", None)
    template_repository_url: str | None = _setting("TEMPLATE_REPOSITORY_URL", None)
    reference_cache_seconds: float = _setting("REFERENCE_CACHE_SECONDS", 30.0, _number)
    reference_timeout_seconds: float = _setting("REFERENCE_TIMEOUT_SECONDS", 5.0, _number)

    start_timeout_seconds: float = _setting("START_TIMEOUT_SECONDS", 120.0, _number)
    stop_timeout_seconds: float = _setting("STOP_TIMEOUT_SECONDS", 120.0, _number)
    reconcile_interval_seconds: float = _setting("RECONCILE_INTERVAL_SECONDS", 10.0, _number)
    relay_poll_seconds: float = _setting("RELAY_POLL_SECONDS", 1.0, _number)
    relay_lease_seconds: float = _setting("RELAY_LEASE_SECONDS", 30.0, _number)
    consumer_max_attempts: int = _setting("CONSUMER_MAX_ATTEMPTS", 5, _integer)
    consumer_prefetch: int = _setting("CONSUMER_PREFETCH", 64, _integer)
    run_relay_in_api: bool = _setting("RUN_RELAY_IN_API", True, _flag)
    worker_health_port: int = _setting("WORKER_HEALTH_PORT", 9102, _integer)
    metrics_token: str | None = _setting("METRICS_TOKEN", None)
    metrics_flow_count_seconds: float = _setting("METRICS_FLOW_COUNT_SECONDS", 15.0, _number)

    web_concurrency: int = _setting("WEB_CONCURRENCY", 2, _integer)
    gunicorn_threads: int = _setting("GUNICORN_THREADS", 4, _integer)
    gunicorn_timeout: int = _setting("GUNICORN_TIMEOUT", 30, _integer)
    gunicorn_graceful_timeout: int = _setting("GUNICORN_GRACEFUL_TIMEOUT", 20, _integer)
    gunicorn_request_timeout: float = _setting("GUNICORN_REQUEST_TIMEOUT", 30.0, _number)
    gunicorn_max_connections: int = _setting("GUNICORN_MAX_CONNECTIONS", 1000, _integer)
    log_level: str = _setting("LOG_LEVEL", "INFO")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            name = item.metadata["env"]
            if name in environ:
                try:
                    values[item.name] = item.metadata["parse"](environ[name])
                except ValueError as error:
                    raise SettingsError(f"{name}: {error}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """The environment variables this object reads."""
        return frozenset(item.metadata["env"] for item in dataclasses.fields(cls))

    def check(self) -> None:
        """Refuse combinations that would leave the service misconfigured."""
        if self.introspect_type not in (None, "basic", "oidc"):
            raise SettingsError("INTROSPECT_TYPE must be basic or oidc")
        if self.logging_service_base_url and not self.logging_service_base_url.startswith(
                ("http://", "https://")):
            raise SettingsError("LOGGING_SERVICE_BASE_URL must be an http or https URL")
        if self.ownership_policy not in ("strict", "oih"):
            raise SettingsError("OWNERSHIP_POLICY must be strict or oih")
        if self.event_queue_type not in ("classic", "quorum"):
            raise SettingsError("EVENT_QUEUE_TYPE must be classic or quorum")
        positive = {
            "PORT": self.port,
            "MAX_BODY_BYTES": self.max_body_bytes,
            "MAX_PAGE_SIZE": self.max_page_size,
            "LOGGING_SERVICE_TIMEOUT_SECONDS": self.logging_service_timeout_seconds,
            "BULK_MAX_ITEMS": self.bulk_max_items,
            "MAX_LIST_BYTES": self.max_list_bytes,
            "CONSUMER_MAX_ATTEMPTS": self.consumer_max_attempts,
            "CONSUMER_PREFETCH": self.consumer_prefetch,
            "WEB_CONCURRENCY": self.web_concurrency,
            "GUNICORN_THREADS": self.gunicorn_threads,
            "GUNICORN_REQUEST_TIMEOUT": self.gunicorn_request_timeout,
            "GUNICORN_MAX_CONNECTIONS": self.gunicorn_max_connections,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{name} must be positive, got {value}")
        if self.history_max_revisions < 0:
            raise SettingsError("HISTORY_MAX_REVISIONS must be 0 (keep all) or more, "
                                f"got {self.history_max_revisions}")

    @property
    def embedded(self) -> bool:
        """True when no MongoDB is configured and the embedded SQLite store is used."""
        return not self.mongodb_url

    @property
    def embedded_database(self) -> str:
        """The embedded store's database: EMBEDDED_DB_PATH (``~`` expanded, made absolute),
        ``:memory:``, or ``flows.sqlite3`` beside the dev token secret in the state directory
        ($XDG_STATE_HOME/flow-repository, by default ~/.local/state/flow-repository)."""
        if self.embedded_db_path == MEMORY_DATABASE:
            return MEMORY_DATABASE
        if self.embedded_db_path:
            return os.path.abspath(os.path.expanduser(self.embedded_db_path))
        return str(state_home() / "flow-repository" / "flows.sqlite3")

    @property
    def auth_mode(self) -> str:
        """Which identity check applies: jwt, basic, oidc or dev (local minted tokens)."""
        if self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url:
            return "jwt"
        if self.introspect_type == "oidc" or (
            self.introspect_type is None
            and self.introspect_endpoint_oidc
            and not self.introspect_endpoint_basic
        ):
            return "oidc"
        if self.introspect_type == "basic" or self.introspect_endpoint_basic:
            return "basic"
        return "dev"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)
