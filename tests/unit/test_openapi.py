"""The committed openapi.json matches what the code generates, and documents the real API."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from flow_repository.entrypoints.cli import main, openapi_document
from flow_repository.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"
REFRESH = ".venv/bin/flow-repository openapi > openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def document(settings: Settings) -> dict[str, Any]:
    return json.loads(openapi_document(settings))


def test_committed_openapi_json_matches_the_code(settings: Settings) -> None:
    assert COMMITTED.exists(), f"openapi.json is missing; create it with `{REFRESH}`"
    generated = openapi_document(settings)
    committed = COMMITTED.read_text(encoding="utf-8")
    if json.loads(committed) != json.loads(generated):
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(keepends=True), (generated + "\n").splitlines(keepends=True),
            "openapi.json (committed)", "openapi.json (generated)"))[:60])
        pytest.fail(f"openapi.json is out of date with the code. Refresh it from the project "
                    f"root with `{REFRESH}` and commit the result.\n{diff}")


def test_committed_openapi_json_is_the_cli_output_byte_for_byte(settings: Settings) -> None:
    assert COMMITTED.read_text(encoding="utf-8") == openapi_document(settings) + "\n", (
        f"openapi.json is not formatted as the CLI writes it; refresh it with `{REFRESH}`")


def test_openapi_command_prints_the_document(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("DEV_TOKEN_SECRET_FILE", settings.dev_token_secret_file)
    monkeypatch.delenv("MONGODB_URL", raising=False)
    assert main(["openapi"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(openapi_document(settings))


def test_served_openapi_json_is_the_generated_document(
    client: FlaskClient, document: dict[str, Any]
) -> None:
    assert client.get("/openapi.json").get_json() == document


def test_document_lists_every_route_and_method(document: dict[str, Any]) -> None:
    routes = {(path, method) for path, item in document["paths"].items()
              for method in item if method in METHODS}
    assert routes >= {
        ("/flows", "get"), ("/flows", "post"), ("/flows/bulk", "patch"),
        ("/flows/{flow_id}", "get"), ("/flows/{flow_id}", "patch"),
        ("/flows/{flow_id}", "delete"), ("/flows/{flow_id}/start", "post"),
        ("/flows/{flow_id}/stop", "post"), ("/flows/multiple/start", "post"),
        ("/flows/multiple/stop", "post"), ("/healthcheck", "get"),
        ("/flows/{flow_id}/steps/{step_id}/logs", "get"),
    }


def test_document_requires_a_bearer_token_except_for_health(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer"}
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthcheck"]["get"]["security"] == []


def test_document_lists_the_list_query_arguments(document: dict[str, Any]) -> None:
    names = {parameter["name"] for parameter in document["paths"]["/flows"]["get"]["parameters"]}
    assert names == {"page[size]", "page[number]", "filter[status]", "filter[type]",
                     "filter[user]", "filter[fromTemplate]", "sort", "search"}


def test_every_documented_error_has_the_services_error_shape(document: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/ErrorResponse"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for code, response in operation["responses"].items():
                if "$ref" in response:
                    name = response["$ref"].rsplit("/", 1)[-1]
                    response = document["components"]["responses"][name]
                health_report = path in ("/healthcheck", "/readyz") and code == "503"  # a report
                if (code == "default" or int(code) >= 400) and not health_report:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, code)
                assert code != "422", f"{method} {path} documents 422, which is never sent"
    properties = document["components"]["schemas"]["ErrorResponse"]["properties"]
    assert set(properties) == {"errors"}
