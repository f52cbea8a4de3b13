"""Flow files and the plan's pure rules: parsing, keys, labels, sync checks, answer shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from flow_repository.client.gitops import (
    Manifest,
    ManifestError,
    desired_body,
    exported,
    file_name,
    in_sync,
    json_patch,
    load_manifests,
    read_manifest,
)
from flow_repository.client.rest import (
    Conflict,
    FlowRepositoryError,
    ValidationError,
    dry_run_of,
    error_for,
    revision_of,
)

FLOW_ID = "0123456789abcdef01234567"


def answer(status: int, body: bytes, headers: dict[str, str] | None = None
           ) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers.update(headers or {})
    return response


def test_a_yaml_file_drops_the_fields_the_service_writes(tmp_path: Path) -> None:
    path = tmp_path / "crm.yaml"
    path.write_text(f"id: {FLOW_ID}\nname: CRM\nstatus: active\nrevision: 7\n"
                    "createdAt: '2026-01-01'\ngraph: {nodes: [], edges: []}\n")
    manifest = read_manifest(path)
    assert manifest.flow_id == FLOW_ID and manifest.source_key is None
    assert manifest.key == FLOW_ID
    assert manifest.body == {"name": "CRM", "graph": {"nodes": [], "edges": []}}


@pytest.mark.parametrize(("text", "problem"), [
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "must hold one object"),
    ("name: no key\n", "needs an id or a flowSettings.sourceKey"),
    ("flowSettings: {sourceKey: ''}\n", "sourceKey must be a non-empty string"),
    ("flowSettings: [1]\nid: x\n", "flowSettings must be an object"),
    ("id: 5\n", "id must be a non-empty string"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_malformed_files_say_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    assert any(problem in line and str(path) in line for line in error.value.problems)


def test_json_files_and_duplicate_keys(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"flowSettings": {"sourceKey": "same"}}')
    (tmp_path / "b.yaml").write_text("flowSettings: {sourceKey: same}\n")
    (tmp_path / "c.json").write_text('{"name": ')
    with pytest.raises(ManifestError) as error:
        load_manifests(tmp_path)
    assert len(error.value.problems) == 2
    assert any("c.json: not valid JSON" in line for line in error.value.problems)
    assert any("sourceKey 'same' is also in" in line for line in error.value.problems)


def test_the_label_is_written_on_create_and_kept_on_update() -> None:
    by_id = Manifest(Path("x.yaml"), {"name": "x"}, FLOW_ID, None)
    assert desired_body(by_id, None) == {"name": "x", "flowSettings": {"sourceKey": FLOW_ID}}
    labelled = Manifest(Path("y.yaml"), {"flowSettings": {"team": "a"}}, None, "k")
    stored = {"id": FLOW_ID, "flowSettings": {"sourceKey": "k", "team": "b"}}
    assert desired_body(labelled, stored) == {"flowSettings": {"team": "a", "sourceKey": "k"}}
    assert desired_body(by_id, stored) == {"name": "x"}, "flowSettings left alone"


def test_in_sync_compares_only_the_fields_a_file_names() -> None:
    stored = {"name": "a", "description": "kept", "owners": [
        {"id": "me", "type": "user"}, {"id": "acme", "type": "tenant"}]}
    assert in_sync({"name": "a"}, stored, owners_exact=True)
    assert not in_sync({"name": "b"}, stored, owners_exact=True)
    tenant_only = {"owners": [{"id": "acme", "type": "tenant"}]}
    assert not in_sync(tenant_only, stored, owners_exact=True)
    assert in_sync(tenant_only, stored, owners_exact=False), "the service adds the caller"
    reordered = {"owners": list(reversed(stored["owners"]))}
    assert in_sync(reordered, stored, owners_exact=True)


def test_json_patch_covers_only_editable_fields() -> None:
    before = {"id": FLOW_ID, "name": "a", "revision": 1, "graph": {"nodes": [{"id": "n"}]}}
    after = {"id": FLOW_ID, "name": "b", "revision": 2, "graph": {"nodes": [{"id": "m"}]}}
    patch = sorted(json_patch(before, after), key=lambda operation: operation["path"])
    assert patch == [{"op": "replace", "path": "/graph/nodes/0/id", "value": "m"},
                     {"op": "replace", "path": "/name", "value": "b"}]


def test_export_shape_and_file_names() -> None:
    flow = {"id": FLOW_ID, "status": "active", "revision": 3, "name": "n",
            "graph": {"nodes": []}, "flowSettings": {"sourceKey": "team/crm sync"}}
    assert list(exported(flow)) == ["id", "name", "flowSettings", "graph"]
    assert file_name(flow, "yaml") == "team_crm_sync.yaml"
    assert file_name({"id": FLOW_ID}, "json") == f"{FLOW_ID}.json"


def test_dry_run_answers_are_read_in_either_shape() -> None:
    nested = dry_run_of({"data": {"flow": {"name": "n"}, "problems": ["p"]},
                         "meta": {"ignoredFields": ["graph.nodes[0].privileged"]}})
    assert (nested.flow, nested.problems, nested.ignored_fields) == (
        {"name": "n"}, ["p"], ["graph.nodes[0].privileged"])
    flat = dry_run_of({"data": {"name": "n", "problems": [{"message": "m", "code": 400}]},
                       "meta": {}})
    assert (flat.flow, flat.problems, flat.ignored_fields) == ({"name": "n"}, ["m"], [])


def test_revisions_and_errors_from_answers() -> None:
    assert revision_of(answer(200, b"{}", {"ETag": '"12"'})) == 12
    assert revision_of(answer(200, b"{}", {"ETag": 'W/"3"'})) == 3
    assert revision_of(answer(200, b"{}"), {"revision": 4}) == 4
    invalid = error_for(answer(400, b'{"errors": [{"message": "a", "code": 400}, '
                                    b'{"message": "b", "code": 400}]}'))
    assert isinstance(invalid, ValidationError) and invalid.problems == ["a", "b"]
    assert isinstance(error_for(answer(409, b'{"errors": []}')), Conflict)
    html = error_for(answer(502, b"<html>Bad gateway</html>"))
    assert type(html) is FlowRepositoryError and html.status == 502
    assert html.messages == ["<html>Bad gateway</html>"]
