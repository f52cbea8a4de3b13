"""The one frozen Settings object, read from OIH-compatible environment variables.

The bottom layer: it imports nothing of ours, so every layer may read it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY_DATABASE = ":memory:"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


ASCII_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")  # int() alone takes "٣", "1_0", " 1 "
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
    value = raw.strip()
    if not ASCII_INTEGER.fullmatch(value):
        raise ValueError(f"expected an integer in ASCII digits, got {raw!r}")
    return int(value)


def _number(raw: str) -> float:
    value = raw.strip()
    if not value.isascii():
        raise ValueError(f"expected a number in ASCII digits, got {raw!r}")
    return float(value)


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


@dataclass(frozen=True)
class Bounds:
    """The documented range of a number setting; ``above`` excludes the lower bound."""

    low: float
    high: float
    above: bool = False

    def admits(self, value: float) -> bool:
        # Written so that NaN is refused: every comparison with it is false.
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def text(self) -> str:
        high = f"{self.high:g}"
        return f"> {self.low:g} and <= {high}" if self.above else f"{self.low:g} to {high}"


def positive(high: float) -> Bounds:
    return Bounds(0, high, above=True)


MIB = 1024 * 1024


def _setting(env: str, default: Any, parse: Callable[[str], Any] = _text,
             bounds: Bounds | None = None, *, secret: bool = False) -> Any:
    """A field read from ``env``; a ``secret`` one may instead be read from ``{env}_FILE``."""
    return field(default=default, metadata={"env": env, "parse": parse, "bounds": bounds,
                                            "secret": secret})


def _read_secret_file(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"{name}_FILE: cannot read {path}: "
                            f"{type(error).__name__}") from None


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; field metadata names the environment variable."""

    port: int = _setting("PORT", 3001, _integer, Bounds(1, 65535))
    health_port: int = _setting("HEALTH_PORT", 0, _integer, Bounds(0, 65535))
    mongodb_url: str | None = _setting("MONGODB_URL", None, secret=True)
    mongodb_timeout_ms: int = _setting("MONGODB_TIMEOUT_MS", 5000, _integer, Bounds(1, 600_000))
    # Without MONGODB_URL: the SQLite file of the embedded store (default: under the state
    # directory, see embedded_database); ":memory:" keeps nothing.
    embedded_db_path: str | None = _setting("EMBEDDED_DB_PATH", None)
    queue_url: str = _setting("QUEUE_URL", "amqp://guest:guest@localhost:5672", secret=True)
    event_exchange: str = _setting("EVENT_EXCHANGE", "event-bus")
    event_queue: str = _setting("EVENT_QUEUE", "flow-repository")
    event_queue_type: str = _setting("EVENT_QUEUE_TYPE", "classic", _lower)

    introspect_type: str | None = _setting("INTROSPECT_TYPE", None)
    introspect_endpoint_basic: str | None = _setting("INTROSPECT_ENDPOINT_BASIC", None)
    introspect_endpoint_oidc: str | None = _setting("INTROSPECT_ENDPOINT_OIDC", None)
    iam_token: str | None = _setting("IAM_TOKEN", None, secret=True)
    oidc_client_id: str | None = _setting("OIDC_CLIENT_ID", None)
    oidc_client_secret: str | None = _setting("OIDC_CLIENT_SECRET", None, secret=True)
    iam_token_cache_ttl: float = _setting("IAM_TOKEN_CACHE_TTL", 60.0, _number, Bounds(0, 86400))
    iam_timeout_seconds: float = _setting("IAM_TIMEOUT_SECONDS", 5.0, _number, positive(300))
    jwt_secret: str | None = _setting("JWT_SECRET", None, secret=True)
    jwt_public_key: str | None = _setting("JWT_PUBLIC_KEY", None, secret=True)
    jwt_jwks_url: str | None = _setting("JWT_JWKS_URL", None)
    jwt_audience: str | None = _setting("JWT_AUDIENCE", None)
    jwt_issuer: str | None = _setting("JWT_ISSUER", None)
    dev_token_secret_file: str | None = _setting("DEV_TOKEN_SECRET_FILE", None)
    # Outside embedded mode development tokens are refused unless this says "allow".
    dev_tokens: str = _setting("DEV_TOKENS", "deny", _lower)

    flow_read_permission: str = _setting("FLOW_READ_PERMISSION", "flows.read")
    flow_write_permission: str = _setting("FLOW_WRITE_PERMISSION", "flows.write")
    flow_control_permission: str = _setting("FLOW_CONTROL_PERMISSION", "flows.control")
    flow_bulk_permission: str = _setting("FLOW_BULK_PERMISSION", "flows.bulk")
    origin_whitelist: tuple[str, ...] = _setting("ORIGINWHITELIST", (), _names)
    ownership_policy: str = _setting("OWNERSHIP_POLICY", "strict", _lower)

    # 16 MiB: MongoDB's largest document, which a flow must fit in.
    max_body_bytes: int = _setting("MAX_BODY_BYTES", MIB, _integer, Bounds(1, 16 * MIB))
    max_page_size: int = _setting("MAX_PAGE_SIZE", 1000, _integer, Bounds(1, 10_000))
    logging_service_base_url: str | None = _setting("LOGGING_SERVICE_BASE_URL", None)
    logging_service_timeout_seconds: float = _setting("LOGGING_SERVICE_TIMEOUT_SECONDS",
                                                      10.0, _number, positive(600))
    bulk_max_items: int = _setting("BULK_MAX_ITEMS", 100, _integer, Bounds(1, 10_000))
    max_list_bytes: int = _setting("MAX_LIST_BYTES", 4 * MIB, _integer, Bounds(1, 256 * MIB))

    history_max_revisions: int = _setting("HISTORY_MAX_REVISIONS", 100, _integer,
                                          Bounds(0, 1_000_000))
    component_repository_url: str | None = _setting("COMPONENT_REPOSITORY_URL", None)
    secret_service_url: str | None = _setting("SECRET_SERVICE_URL", None)
    template_repository_url: str | None = _setting("TEMPLATE_REPOSITORY_URL", None)
    reference_cache_seconds: float = _setting("REFERENCE_CACHE_SECONDS", 30.0, _number,
                                              Bounds(0, 86400))
    reference_timeout_seconds: float = _setting("REFERENCE_TIMEOUT_SECONDS", 5.0, _number,
                                                positive(300))

    start_timeout_seconds: float = _setting("START_TIMEOUT_SECONDS", 120.0, _number,
                                            positive(86400))
    stop_timeout_seconds: float = _setting("STOP_TIMEOUT_SECONDS", 120.0, _number,
                                           positive(86400))
    # Lower bounds keep the loops from spinning: 0 would busy-loop or publish nothing.
    reconcile_interval_seconds: float = _setting("RECONCILE_INTERVAL_SECONDS", 10.0, _number,
                                                 Bounds(0.05, 3600))
    relay_poll_seconds: float = _setting("RELAY_POLL_SECONDS", 1.0, _number, Bounds(0.05, 60))
    relay_lease_seconds: float = _setting("RELAY_LEASE_SECONDS", 30.0, _number, Bounds(1, 3600))
    consumer_max_attempts: int = _setting("CONSUMER_MAX_ATTEMPTS", 5, _integer, Bounds(1, 1000))
    consumer_prefetch: int = _setting("CONSUMER_PREFETCH", 64, _integer, Bounds(1, 65535))
    run_relay_in_api: bool = _setting("RUN_RELAY_IN_API", True, _flag)
    worker_health_port: int = _setting("WORKER_HEALTH_PORT", 9102, _integer, Bounds(1, 65535))
    metrics_token: str | None = _setting("METRICS_TOKEN", None, secret=True)
    metrics_flow_count_seconds: float = _setting("METRICS_FLOW_COUNT_SECONDS", 15.0, _number,
                                                 Bounds(0, 3600))

    # The change feed, GET /flows/events (docs/watch.rst).
    max_watchers: int = _setting("MAX_WATCHERS", 64, _integer, Bounds(0, 10_000))
    max_watchers_per_caller: int = _setting("MAX_WATCHERS_PER_CALLER", 4, _integer,
                                            Bounds(1, 10_000))
    watch_heartbeat_seconds: float = _setting("WATCH_HEARTBEAT_SECONDS", 15.0, _number,
                                              Bounds(0.05, 300))
    watch_poll_seconds: float = _setting("WATCH_POLL_SECONDS", 0.05, _number, Bounds(0.01, 10))
    watch_gap_seconds: float = _setting("WATCH_GAP_SECONDS", 2.0, _number, Bounds(0.05, 60))
    watch_retention_seconds: float = _setting("WATCH_RETENTION_SECONDS", 7 * 86400.0, _number,
                                              Bounds(60, 366 * 86400))
    watch_send_timeout_seconds: float = _setting("WATCH_SEND_TIMEOUT_SECONDS", 10.0, _number,
                                                 Bounds(0.1, 600))
    watch_max_seconds: float = _setting("WATCH_MAX_SECONDS", 900.0, _number,
                                        Bounds(1, 86400))

    web_concurrency: int = _setting("WEB_CONCURRENCY", 2, _integer, Bounds(1, 64))
    gunicorn_threads: int = _setting("GUNICORN_THREADS", 4, _integer, Bounds(1, 256))
    gunicorn_timeout: int = _setting("GUNICORN_TIMEOUT", 30, _integer, Bounds(1, 3600))
    gunicorn_graceful_timeout: int = _setting("GUNICORN_GRACEFUL_TIMEOUT", 20, _integer,
                                              Bounds(0, 3600))
    gunicorn_request_timeout: float = _setting("GUNICORN_REQUEST_TIMEOUT", 30.0, _number,
                                               positive(3600))
    gunicorn_max_connections: int = _setting("GUNICORN_MAX_CONNECTIONS", 1000, _integer,
                                             Bounds(1, 100_000))
    log_level: str = _setting("LOG_LEVEL", "INFO")

    # Tracing (docs/tracing.rst): the standard OpenTelemetry variables that turn it on and
    # pick the exporter; the SDK reads every other OTEL_* variable itself.
    otel_traces_exporter: str | None = _setting("OTEL_TRACES_EXPORTER", None, _lower)
    otel_exporter_otlp_protocol: str = _setting("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                "http/protobuf", _lower)
    otel_sdk_disabled: bool = _setting("OTEL_SDK_DISABLED", False, _flag)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            name = item.metadata["env"]
            raw = environ.get(name)
            file_name = f"{name}_FILE"
            if item.metadata["secret"] and environ.get(file_name):
                if raw is not None:
                    raise SettingsError(f"set {name} or {file_name}, not both")
                raw = _read_secret_file(name, environ[file_name])
            if raw is not None:
                try:
                    values[item.name] = item.metadata["parse"](raw)
                except ValueError as error:
                    raise SettingsError(f"{name}: {error}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """The environment variables this object reads (``*_FILE`` variants included)."""
        return frozenset(item.metadata["env"] for item in dataclasses.fields(cls)) | \
            cls.secret_file_names()

    @classmethod
    def secret_file_names(cls) -> frozenset[str]:
        """The ``*_FILE`` variables that may hold a secret setting's value instead."""
        return frozenset(f"{item.metadata['env']}_FILE" for item in dataclasses.fields(cls)
                         if item.metadata["secret"])

    @classmethod
    def bounds(cls) -> dict[str, Bounds]:
        """The documented range of every number setting, by environment variable."""
        return {item.metadata["env"]: item.metadata["bounds"] for item in dataclasses.fields(cls)
                if item.metadata["bounds"] is not None}

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
        if self.health_port and self.health_port in (self.port, self.worker_health_port):
            raise SettingsError(f"HEALTH_PORT={self.health_port} must differ from PORT and "
                                "WORKER_HEALTH_PORT")
        if self.otel_traces_exporter not in (None, "none", "otlp", "console"):
            raise SettingsError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got "
                                f"{self.otel_traces_exporter!r}")
        if self.otel_exporter_otlp_protocol not in ("http/protobuf", "grpc"):
            raise SettingsError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf or grpc, "
                                f"got {self.otel_exporter_otlp_protocol!r}")
        if self.dev_tokens not in ("allow", "deny"):
            raise SettingsError(f"DEV_TOKENS must be allow or deny, got {self.dev_tokens!r}")
        for item in dataclasses.fields(self):
            bounds = item.metadata["bounds"]
            value = getattr(self, item.name)
            if bounds is not None and not bounds.admits(value):
                raise SettingsError(f"{item.metadata['env']}={value!r} is out of range: "
                                    f"it must be {bounds.text()}")

    @property
    def embedded(self) -> bool:
        """True when no MongoDB is configured and the embedded SQLite store is used."""
        return not self.mongodb_url

    @property
    def dev_tokens_allowed(self) -> bool:
        """Whether development tokens may be the identity check (embedded, or DEV_TOKENS)."""
        return self.embedded or self.dev_tokens == "allow"

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


# What each setting means, for the documentation (docs/configuration.rst renders every
# field with its variable, default, range and this text; a test checks none is missing).
MEANING: dict[str, str] = {
    "PORT": "HTTP port of the API",
    "HEALTH_PORT": "second listener for /livez and /readyz only (see Health checks)",
    "MONGODB_URL": "MongoDB connection string",
    "EMBEDDED_DB_PATH": "embedded store's SQLite file (``:memory:``: keep nothing)",
    "MONGODB_TIMEOUT_MS": "server selection / connect timeout",
    "QUEUE_URL": "RabbitMQ",
    "EVENT_EXCHANGE": "topic exchange of the OIH event bus",
    "EVENT_QUEUE": "durable queue the worker consumes",
    "EVENT_QUEUE_TYPE": "``classic`` (as OIH) or ``quorum`` (see below)",
    "INTROSPECT_TYPE": "``basic`` or ``oidc``",
    "INTROSPECT_ENDPOINT_BASIC": "IAM basic introspection URL",
    "INTROSPECT_ENDPOINT_OIDC": "OIDC introspection URL",
    "IAM_TOKEN": "service token sent to IAM (basic)",
    "OIDC_CLIENT_ID": "client id for OIDC introspection",
    "OIDC_CLIENT_SECRET": "client secret for OIDC introspection",
    "IAM_TOKEN_CACHE_TTL": "seconds an introspection result is cached",
    "IAM_TIMEOUT_SECONDS": "timeout of calls to IAM",
    "JWT_SECRET": "HS256 secret (local JWT verification)",
    "JWT_PUBLIC_KEY": "PEM public key (RS256, ES256, EdDSA)",
    "JWT_JWKS_URL": "JWKS URL",
    "JWT_AUDIENCE": "required ``aud``",
    "JWT_ISSUER": "required ``iss``",
    "DEV_TOKEN_SECRET_FILE": "secret of development tokens",
    "DEV_TOKENS": "``allow``: accept development tokens with ``MONGODB_URL`` set",
    "FLOW_READ_PERMISSION": "permission to read flows",
    "FLOW_WRITE_PERMISSION": "permission to create/change/delete",
    "FLOW_CONTROL_PERMISSION": "permission to start/stop",
    "FLOW_BULK_PERMISSION": "extra permission for bulk routes",
    "ORIGINWHITELIST": "comma-separated CORS origins",
    "OWNERSHIP_POLICY": "``strict`` or ``oih`` (see Security)",
    "MAX_BODY_BYTES": "larger request bodies get 413",
    "BULK_MAX_ITEMS": "items per bulk request",
    "MAX_PAGE_SIZE": "larger ``page[size]`` values are clamped to it",
    "MAX_LIST_BYTES": "bytes of flows in one list answer",
    "LOGGING_SERVICE_BASE_URL": "OIH logging service, for step logs",
    "LOGGING_SERVICE_TIMEOUT_SECONDS": "connect and read timeout of step logs (504)",
    "HISTORY_MAX_REVISIONS": "revisions kept per flow (0: every one)",
    "COMPONENT_REPOSITORY_URL": "check ``componentId``: ``GET {url}/components/{id}``",
    "SECRET_SERVICE_URL": "check ``credentials_id``: ``GET {url}/secrets/{id}``",
    "TEMPLATE_REPOSITORY_URL": "check ``fromTemplate``: ``GET {url}/templates/{id}``",
    "REFERENCE_CACHE_SECONDS": "how long a found reference is remembered",
    "REFERENCE_TIMEOUT_SECONDS": "timeout of one reference check",
    "START_TIMEOUT_SECONDS": "orchestrator answer deadline for a start",
    "STOP_TIMEOUT_SECONDS": "orchestrator answer deadline for a stop",
    "RECONCILE_INTERVAL_SECONDS": "how often overdue flows are looked for",
    "RELAY_POLL_SECONDS": "outbox poll interval (writes wake it at once)",
    "RELAY_LEASE_SECONDS": "per-flow publishing lease of a relay",
    "CONSUMER_MAX_ATTEMPTS": "failures before a message is dead-lettered",
    "CONSUMER_PREFETCH": "messages a consumer holds unacknowledged",
    "RUN_RELAY_IN_API": "API processes relay their own events",
    "WORKER_HEALTH_PORT": "worker's /livez, /healthcheck, /metrics",
    "METRICS_TOKEN": "when set, /metrics needs it as Bearer",
    "METRICS_FLOW_COUNT_SECONDS": "how long /metrics reuses its flow counts",
    "MAX_WATCHERS": "open ``GET /flows/events`` streams per API process (503 beyond)",
    "MAX_WATCHERS_PER_CALLER": "open streams per caller (``sub``) and process (429 beyond)",
    "WATCH_HEARTBEAT_SECONDS": "a ``: keep-alive`` comment after this long without events",
    "WATCH_POLL_SECONDS": "how often a process looks for new changes while streams are open",
    "WATCH_GAP_SECONDS": "MongoDB: how long a reader waits for a missing seq before it "
                         "is abandoned",
    "WATCH_RETENTION_SECONDS": "how long changes stay resumable (410 beyond)",
    "WATCH_SEND_TIMEOUT_SECONDS": "a stream whose reader takes no bytes this long is dropped",
    "WATCH_MAX_SECONDS": "a stream ends after this long; the client reconnects",
    "WEB_CONCURRENCY": "gunicorn worker processes (1 with ``:memory:``)",
    "GUNICORN_THREADS": "threads per gunicorn worker",
    "GUNICORN_TIMEOUT": "gunicorn worker timeout (s)",
    "GUNICORN_GRACEFUL_TIMEOUT": "time to finish requests on SIGTERM (s)",
    "GUNICORN_REQUEST_TIMEOUT": "time to receive a whole request (s), else 408",
    "GUNICORN_MAX_CONNECTIONS": "open connections per gunicorn worker",
    "LOG_LEVEL": "log level (logs are JSON lines)",
    "OTEL_TRACES_EXPORTER": "``otlp`` or ``console``: tracing on (see Tracing); ``none``: off",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "``http/protobuf`` (port 4318) or ``grpc`` (4317)",
    "OTEL_SDK_DISABLED": "``true``: tracing off whatever else is set",
}

# The default as the documentation shows it, where the field"s own default does not say it.
DEFAULT_SHOWN: dict[str, str] = {
    "HEALTH_PORT": "0 (none)",
    "MONGODB_URL": "unset (embedded SQLite store)",
    "EMBEDDED_DB_PATH": "$XDG_STATE_HOME/flow-repository/...",
    "DEV_TOKEN_SECRET_FILE": "$XDG_STATE_HOME/flow-repository/...",
    "LOGGING_SERVICE_BASE_URL": "unset (step logs answer 501)",
    "METRICS_TOKEN": "unset (public)",
    "OTEL_TRACES_EXPORTER": "unset (tracing off)",
}


def reference_rows() -> list[tuple[str, str, str, str]]:
    """Every setting as the documentation lists it: variable, default, range and meaning."""
    rows = []
    for item in dataclasses.fields(Settings):
        env, default, bounds = item.metadata["env"], item.default, item.metadata["bounds"]
        if env in DEFAULT_SHOWN:
            shown = DEFAULT_SHOWN[env]
        elif default is None:
            shown = "unset"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif default == ():
            shown = "empty"
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        rows.append((env, shown, bounds.text() if bounds else "", MEANING[env]))
    return rows


def reference_table() -> str:
    """The settings as a reStructuredText table, one line a setting (docs/configuration.rst)."""
    header = ("Variable", "Default", "Range", "Meaning")
    cells = [header, *((f"``{env}``", *rest) for env, *rest in reference_rows())]
    widths = [max(len(row[column]) for row in cells) for column in range(4)]
    rule = "  ".join("=" * width for width in widths)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))

    body = [line(row).rstrip() for row in cells[1:]]
    return "\n".join([rule, line(header).rstrip(), rule, *body, rule]) + "\n"
