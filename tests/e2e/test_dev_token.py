"""Local development mode: ``flow-repository token`` mints what a served process then accepts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support import EXECUTABLE, Served, base_env, bearer, free_port

pytestmark = pytest.mark.e2e


def mint(env: dict[str, str], *arguments: str) -> str:
    done = subprocess.run([str(EXECUTABLE), "token", *arguments], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2, f"not a JWT: {done.stdout!r}"
    return token


def test_minted_token_is_accepted_and_no_token_is_refused(spawn, process_env,
                                                          tmp_path: Path, flow_body) -> None:
    secret = tmp_path / "dev-token-secret"
    env = {**process_env, "DEV_TOKEN_SECRET_FILE": str(secret)}
    writer = mint(env, "--sub", "dev-user", "--tenant", "dev-tenant",
                  "--permissions", "flows.read,flows.write")
    reader = mint(env, "--sub", "dev-reader", "--tenant", "other-tenant",
                  "--permissions", "flows.read")
    assert secret.exists()

    port = free_port()
    api: Served = spawn(["serve"], {**env, "PORT": str(port)}, port)
    api.wait_ready()

    created = api.request("POST", "/flows", headers=bearer(writer), json=flow_body())
    assert created.status_code == 201, created.text
    owners = created.json()["data"]["owners"]
    assert {"id": "dev-user", "type": "user"} in owners
    assert {"id": "dev-tenant", "type": "tenant"} in owners
    listed = api.get("/flows", headers=bearer(writer))
    assert listed.status_code == 200
    assert listed.json()["meta"]["total"] == 1

    # Permissions and visibility come from the minted claims.
    assert api.get("/flows", headers=bearer(reader)).json()["meta"]["total"] == 0
    denied = api.request("POST", "/flows", headers=bearer(reader), json=flow_body())
    assert denied.status_code == 403
    assert denied.json()["errors"][0]["message"] == "MISSING_PERMISSION"
    control = api.request("POST", f"/flows/{created.json()['data']['id']}/start",
                          headers=bearer(writer))
    assert control.status_code == 403

    # Never open: no token, a forged token, a token of another secret.
    missing = api.get("/flows")
    assert missing.status_code == 401
    assert missing.json()["errors"][0]["message"] == "Missing authorization header."
    assert api.get("/flows", headers=bearer(writer[:-4] + "AAAA")).status_code == 401
    other_env = {**env, "DEV_TOKEN_SECRET_FILE": str(tmp_path / "another-secret")}
    stranger = mint(other_env, "--sub", "dev-user", "--tenant", "dev-tenant")
    assert api.get("/flows", headers=bearer(stranger)).status_code == 401
    assert api.request("POST", "/flows", json=flow_body()).status_code == 401


def test_token_command_refuses_when_iam_is_configured(tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "home"), "INTROSPECT_TYPE": "basic",
           "INTROSPECT_ENDPOINT_BASIC": "http://127.0.0.1:9/introspect"}
    done = subprocess.run([str(EXECUTABLE), "token", "--sub", "someone"], env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stdout.strip() == ""
    assert "IAM" in done.stderr


def test_serve_refuses_a_dev_secret_file_others_can_write(spawn, settings, broker,
                                                          tmp_path: Path) -> None:
    secret = tmp_path / "dev-token-secret"
    secret.write_text("planted-by-someone-else\n")
    secret.chmod(0o666)
    env = {**base_env(tmp_path / "home"), "DEV_TOKEN_SECRET_FILE": str(secret),
           "QUEUE_URL": settings.queue_url, "EVENT_EXCHANGE": settings.event_exchange,
           "EVENT_QUEUE": settings.event_queue}
    served: Served = spawn(["serve"], {**env, "PORT": str(free_port())}, None)
    assert served.process.wait(60) == 2
    assert "writable by group or others" in served.stderr()
    assert str(secret) in served.stderr()


def test_serve_logs_that_dev_tokens_are_not_for_production(spawn, settings, broker,
                                                           tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "home"), "DEV_TOKEN_SECRET_FILE": str(tmp_path / "secret"),
           "QUEUE_URL": settings.queue_url, "EVENT_EXCHANGE": settings.event_exchange,
           "EVENT_QUEUE": settings.event_queue}
    port = free_port()
    served: Served = spawn(["serve"], {**env, "PORT": str(port)}, port)
    served.wait_ready()
    modes = [json.loads(line) for line in served.stderr().splitlines()
             if "identityMode" in line]
    assert modes and all(entry["identityMode"] == "dev" for entry in modes)
    assert "NOT FOR PRODUCTION" in modes[0]["message"]
    assert modes[0]["level"] == "warning"
