"""Settings read from the environment: values, ranges, secrets from files, identity."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flow_repository.adapters.auth import build_authenticator
from flow_repository.settings import Settings, SettingsError, reference_table


def test_the_queue_type_defaults_to_classic_and_reads_quorum_in_any_case() -> None:
    assert Settings.from_env({}).event_queue_type == "classic"
    assert Settings.from_env({"EVENT_QUEUE_TYPE": " Quorum "}).event_queue_type == "quorum"


@pytest.mark.parametrize(("name", "value"), [
    ("EVENT_QUEUE_TYPE", "stream"), ("EVENT_QUEUE_TYPE", ""), ("CONSUMER_PREFETCH", "0"),
])
def test_unusable_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


# ----------------------------------------------------------------------------- ranges (issue 16)


@pytest.mark.parametrize(("name", "value"), [
    ("RELAY_LEASE_SECONDS", "0"), ("RECONCILE_INTERVAL_SECONDS", "0"),
    ("RELAY_POLL_SECONDS", "-1"), ("START_TIMEOUT_SECONDS", "nan"),
    ("STOP_TIMEOUT_SECONDS", "inf"), ("IAM_TIMEOUT_SECONDS", "0"), ("PORT", "70000"),
    ("GUNICORN_MAX_CONNECTIONS", "0"), ("HISTORY_MAX_REVISIONS", "-1"),
    ("MAX_BODY_BYTES", str(64 * 1024 * 1024)), ("HEALTH_PORT", "-5"),
])
def test_a_number_out_of_its_range_names_the_setting_the_value_and_the_range(
        name: str, value: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({name: value})
    message = str(refused.value)
    assert message.startswith(f"{name}=") and "out of range" in message
    assert Settings.bounds()[name].text() in message


def test_every_number_setting_has_a_range_and_every_default_is_in_it() -> None:
    defaults = Settings()
    numbers = {item.metadata["env"] for item in dataclasses.fields(Settings)
               if item.type in ("int", "float")}
    assert numbers == set(Settings.bounds())
    for item in dataclasses.fields(Settings):
        bounds = item.metadata["bounds"]
        assert bounds is None or bounds.admits(getattr(defaults, item.name)), item.name


@pytest.mark.parametrize("value", ["\u0663", "1_000", "\u00b9", "0x10", "１０"])
def test_numbers_take_ascii_digits_only(value: str) -> None:
    with pytest.raises(SettingsError, match="PORT"):
        Settings.from_env({"PORT": value})


def test_the_readme_names_every_setting_and_its_range() -> None:
    # The settings table of docs/configuration.rst, rendered from Settings at build time.
    readme = reference_table()
    for name, bounds in Settings.bounds().items():
        row = next((line for line in readme.splitlines() if line.startswith(f"``{name}``")),
                   None)
        assert row is not None, f"{name} is not in the README's settings table"
        assert bounds.text() in row, f"the README's row of {name} does not give {bounds.text()}"


# ----------------------------------------------------------------------------- secrets from files


def test_a_secret_is_read_from_its_file_variant(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("mongodb://u:p@db:27017/flows\n")
    (tmp_path / "token").write_text("iam-service-token")
    settings = Settings.from_env({"MONGODB_URL_FILE": str(tmp_path / "url"),
                                  "IAM_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.mongodb_url == "mongodb://u:p@db:27017/flows"
    assert settings.iam_token == "iam-service-token"
    assert {"MONGODB_URL_FILE", "QUEUE_URL_FILE", "IAM_TOKEN_FILE", "OIDC_CLIENT_SECRET_FILE",
            "JWT_SECRET_FILE", "METRICS_TOKEN_FILE"} <= Settings.secret_file_names()


def test_a_secret_and_its_file_variant_together_or_an_unreadable_file_are_refused(
        tmp_path: Path) -> None:
    (tmp_path / "q").write_text("amqp://a:b@h")
    with pytest.raises(SettingsError, match="QUEUE_URL or QUEUE_URL_FILE"):
        Settings.from_env({"QUEUE_URL": "amqp://h", "QUEUE_URL_FILE": str(tmp_path / "q")})
    with pytest.raises(SettingsError, match="QUEUE_URL_FILE"):
        Settings.from_env({"QUEUE_URL_FILE": str(tmp_path / "missing")})


# ----------------------------------------------------------------------------- dev tokens


def test_production_refuses_dev_tokens_unless_explicitly_allowed(tmp_path: Path) -> None:
    production = Settings.from_env({"MONGODB_URL": "mongodb://db:27017/flows",
                                    "DEV_TOKEN_SECRET_FILE": str(tmp_path / "secret")})
    with pytest.raises(SettingsError) as refused:
        build_authenticator(production)
    for name in ("MONGODB_URL", "INTROSPECT_TYPE", "INTROSPECT_ENDPOINT_BASIC", "IAM_TOKEN",
                 "INTROSPECT_ENDPOINT_OIDC", "JWT_SECRET", "JWT_JWKS_URL", "DEV_TOKENS=allow"):
        assert name in str(refused.value)
    assert build_authenticator(production.replace(dev_tokens="allow")) is not None
    assert build_authenticator(production.replace(mongodb_url=None)) is not None  # embedded
    assert build_authenticator(production.replace(jwt_secret="x" * 32)) is not None
    with pytest.raises(SettingsError, match="DEV_TOKENS"):
        Settings.from_env({"DEV_TOKENS": "maybe"})


def test_serve_on_mongodb_without_identity_exits_naming_the_settings(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "MONGODB_URL": "mongodb://127.0.0.1:9/flows", "PORT": "1",
           "DEV_TOKEN_SECRET_FILE": str(tmp_path / "secret")}
    done = subprocess.run([sys.executable, "-m", "flow_repository.entrypoints.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "INTROSPECT_TYPE" in done.stderr and "DEV_TOKENS=allow" in done.stderr
