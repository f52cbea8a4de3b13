"""The generated parts of the documentation: the settings table and the route reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from flow_repository.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def docs_conf():
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_includes_the_table_rendered_from_settings() -> None:
    assert ".. include:: _generated/settings.rst" in (DOCS / "configuration.rst").read_text()
    table = docs_conf().settings_page()
    for name in Settings.env_names() - Settings.secret_file_names():
        assert f"``{name}``" in table, name


def test_the_rest_api_page_includes_every_route_of_the_committed_openapi_document() -> None:
    assert ".. include:: _generated/openapi.rst" in (DOCS / "rest-api.rst").read_text()
    reference = docs_conf().openapi_page()
    document = json.loads((DOCS.parent / "openapi.json").read_text())
    for path, operations in document["paths"].items():
        for method in operations:
            if method in {"get", "post", "put", "patch", "delete"}:
                assert f"``{method.upper()} {path}``" in reference, (method, path)
