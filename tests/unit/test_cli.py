"""`flow-repository token` mints development tokens that an app with the same settings accepts."""

from __future__ import annotations

from collections.abc import Callable

import jwt
import pytest
from flask.testing import FlaskClient

from flow_repository.entrypoints.cli import main
from flow_repository.settings import Settings

AUTH_VARIABLES = ("JWT_SECRET", "JWT_PUBLIC_KEY", "JWT_JWKS_URL", "JWT_AUDIENCE", "JWT_ISSUER",
                  "INTROSPECT_TYPE", "INTROSPECT_ENDPOINT_BASIC", "INTROSPECT_ENDPOINT_OIDC")


@pytest.fixture
def cli_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], settings: Settings
) -> Callable[..., str]:
    """cli_token(*arguments): run `flow-repository token ...` with the test's secret file."""
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEV_TOKEN_SECRET_FILE", settings.dev_token_secret_file)

    def run(*arguments: str) -> str:
        assert main(["token", *arguments]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        lines = captured.out.splitlines()
        assert len(lines) == 1, captured.out
        return lines[0]

    return run


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_minted_token_is_accepted_by_the_app(client: FlaskClient, cli_token) -> None:
    token = cli_token("--sub", "cli-user", "--tenant", "cli-tenant", "--permissions",
                      "flows.read,flows.write")
    response = client.get("/flows", headers=bearer(token))
    assert response.status_code == 200


def test_minted_token_carries_subject_and_tenant(
    client: FlaskClient, cli_token, flow_body: Callable[..., dict]
) -> None:
    token = cli_token("--sub", "cli-user", "--tenant", "cli-tenant", "--permissions",
                      "flows.read, flows.write")
    response = client.post("/flows", json=flow_body(), headers=bearer(token))
    assert response.status_code == 201
    data = response.get_json()["data"]
    assert data["owners"] == [{"id": "cli-user", "type": "user"},
                              {"id": "cli-tenant", "type": "tenant"}]
    assert data["tenant"] == "cli-tenant"


def test_minted_token_grants_only_the_named_permissions(
    client: FlaskClient, cli_token, flow_body: Callable[..., dict], error_messages
) -> None:
    token = cli_token("--sub", "reader", "--permissions", "flows.read")
    assert client.get("/flows", headers=bearer(token)).status_code == 200
    response = client.post("/flows", json=flow_body(), headers=bearer(token))
    assert error_messages(response, 403) == ["MISSING_PERMISSION"]


def test_default_permissions_make_an_admin(
    client: FlaskClient, cli_token, create
) -> None:
    theirs = create()
    token = cli_token("--sub", "operator")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["permissions"] == ["all"]
    response = client.get(f"/flows/{theirs['id']}", headers=bearer(token))
    assert response.status_code == 200


def test_token_lifetime_follows_ttl(client: FlaskClient, cli_token, error_messages) -> None:
    token = cli_token("--sub", "u", "--ttl", "120")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    expired = cli_token("--sub", "u", "--ttl", "-10")
    response = client.get("/flows", headers=bearer(expired))
    assert error_messages(response, 401) == ["Token expired."]


def test_token_for_another_secret_file_is_refused(
    client: FlaskClient, cli_token, monkeypatch: pytest.MonkeyPatch, tmp_path, error_messages
) -> None:
    monkeypatch.setenv("DEV_TOKEN_SECRET_FILE", str(tmp_path / "another-secret"))
    token = cli_token("--sub", "u")
    assert error_messages(client.get("/flows", headers=bearer(token)), 401) == [
        "Invalid token."]


def test_token_uses_jwt_secret_and_audience_when_configured(
    build_app, cli_token, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "cli-test-jwt-secret-0123456789abcdef-0123456789abcdef"
    monkeypatch.setenv("JWT_SECRET", secret)
    monkeypatch.setenv("JWT_AUDIENCE", "flow-repository")
    token = cli_token("--sub", "u", "--permissions", "flows.read")
    client = build_app(jwt_secret=secret, jwt_audience="flow-repository").test_client()
    assert client.get("/flows", headers=bearer(token)).status_code == 200


def test_token_is_refused_when_iam_issues_tokens(
    cli_token, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INTROSPECT_ENDPOINT_BASIC", "http://iam.example/introspect")
    assert main(["token", "--sub", "u"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("flow-repository token: ")
    assert "IAM" in captured.err


def test_token_needs_a_subject(cli_token, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["token"])
    assert exited.value.code == 2
    assert "--sub" in capsys.readouterr().err
