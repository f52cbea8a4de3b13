"""Sphinx configuration. Two pages are partly generated at build time so they cannot drift:
the settings table (from flow_repository.settings.Settings) and the route reference
(from the committed openapi.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "Flow Repository"
author = "Flow Repository contributors"
copyright = "the Flow Repository contributors"
extensions: list[str] = []
exclude_patterns = ["_build", "_generated/*.rst"]
html_theme = "alabaster"
html_static_path: list[str] = []
GENERATED = DOCS / "_generated"


def settings_page() -> str:
    from flow_repository.settings import reference_table

    return reference_table()


def _schema_text(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "")
    if kind == "array":
        return f"array of {_schema_text(schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(str(value) for value in schema["enum"])
    limits = [f"{key} {schema[key]}" for key in ("minimum", "maximum", "maxLength")
              if key in schema]
    return ", ".join([kind, *limits]) if limits else kind


def openapi_page() -> str:
    """Every route of openapi.json: its methods, parameters and answers."""
    document = json.loads((ROOT / "openapi.json").read_text())
    out: list[str] = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            title = f"``{method.upper()} {path}``"
            out += [title, "~" * len(title), ""]
            summary = operation.get("summary") or operation.get("description") or ""
            if summary:
                out += [" ".join(summary.split()), ""]
            parameters = operation.get("parameters", [])
            if parameters:
                out += ["Parameters:", ""]
                out += [f"- ``{item['name']}`` ({item['in']}"
                        f"{', required' if item.get('required') else ''}): "
                        f"{_schema_text(item.get('schema', {}))}" for item in parameters]
                out.append("")
            out += ["Answers: " + ", ".join(
                f"{code} ({' '.join((answer.get('description') or '').split()) or '-'})"
                for code, answer in operation["responses"].items()), ""]
    return "\n".join(out) + "\n"


def generate(_app: object = None) -> None:
    GENERATED.mkdir(exist_ok=True)
    for name, render in (("settings.rst", settings_page), ("openapi.rst", openapi_page)):
        target = GENERATED / name
        text = render()
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def setup(app: object) -> dict:
    app.connect("builder-inited", generate)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
