"""Every list has the same bounds as GET /flows: page size clamped to MAX_PAGE_SIZE, answer
cut at MAX_LIST_BYTES, and the store read no further than the answer reaches (issue 16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flow_repository.adapters.store.base import SharedDocument
from flow_repository.domain.flow import ListQuery
from flow_repository.services.listing import bounded_page

BIG = "x" * 3000  # a setting that makes each flow about 3.5 kB of JSON


def make_flows(app: Flask, headers: dict, flow_body: Callable[..., dict], count: int,
               **extra: Any) -> list[str]:
    client = app.test_client()
    ids = []
    for index in range(count):
        answer = client.post("/flows", json=flow_body(f"flow {index}", **extra), headers=headers)
        assert answer.status_code == 201, answer.get_json()
        ids.append(answer.get_json()["data"]["id"])
    return ids


def test_revisions_page_size_is_clamped_like_flows(build_app: Callable[..., Flask],
                                                   auth: Callable[..., dict],
                                                   flow_body: Callable[..., dict]) -> None:
    app = build_app(max_page_size=2)
    client = app.test_client()
    [flow_id] = make_flows(app, auth(), flow_body, 1)
    for index in range(3):
        assert client.patch(f"/flows/{flow_id}", json={"name": f"n{index}"},
                            headers=auth()).status_code == 200
    body = client.get(f"/flows/{flow_id}/revisions?page[size]=1000", headers=auth()).get_json()
    assert body["meta"] == {"total": 4, "page": 1, "perPage": 2, "totalPages": 2}
    assert [entry["revision"] for entry in body["data"]] == [4, 3]


def test_revisions_are_cut_at_max_list_bytes_as_flows_are(build_app: Callable[..., Flask],
                                                          auth: Callable[..., dict],
                                                          flow_body: Callable[..., dict]) -> None:
    app = build_app(max_list_bytes=10_000)
    client = app.test_client()
    [flow_id] = make_flows(app, auth(), flow_body, 1, flowSettings={"blob": BIG})
    for index in range(5):
        assert client.patch(f"/flows/{flow_id}", json={"name": f"n{index}"},
                            headers=auth()).status_code == 200
    body = client.get(f"/flows/{flow_id}/revisions?page[size]=6", headers=auth()).get_json()
    assert body["meta"]["truncated"] is True
    assert body["meta"]["perPage"] == len(body["data"]) < 6
    assert body["meta"]["totalPages"] == -(-6 // body["meta"]["perPage"])
    flows = client.get("/flows?page[size]=6", headers=auth()).get_json()
    assert flows["meta"] == {"total": 1, "page": 1, "perPage": 6, "totalPages": 1}


@pytest.mark.parametrize("backend", ["embedded", "mongomock"])
def test_a_cut_page_is_read_no_further_than_the_budget(
        backend: str, store_of: Callable, build_app: Callable[..., Flask],
        auth: Callable[..., dict], flow_body: Callable[..., dict]) -> None:
    store = store_of(backend)
    app = build_app(store, max_list_bytes=10_000)
    make_flows(app, auth(), flow_body, 12, flowSettings={"blob": BIG})
    seen: list[dict] = []

    def counting(document: dict) -> bool:
        seen.append(document)
        return len(seen) < 3

    page, total = store.list(ListQuery(page_size=12), None, fits=counting)
    assert total == 12 and len(page) == len(seen) == 3  # not the 12 of the page

    read: list[int] = []
    original = store.list

    def spying(query: ListQuery, owner_ids: Any, *, fits: Any = None) -> Any:
        result = original(query, owner_ids, fits=fits)
        read.append(len(result[0]))
        return result

    store.list = spying
    body = app.test_client().get("/flows?page[size]=12", headers=auth()).get_json()
    assert body["meta"]["truncated"] is True
    assert read == [len(body["data"]) + 1]  # the page, and the one flow that did not fit

    [flow_id] = [flow["id"] for flow in body["data"][:1]]
    client = app.test_client()
    for index in range(8):
        client.patch(f"/flows/{flow_id}", json={"name": f"n{index}"}, headers=auth())
    entries, count = store.history.page(_oid(flow_id), 1, 9, fits=lambda _: False)
    assert count == 9 and len(entries) == 1


def _oid(text: str) -> Any:
    from bson import ObjectId

    return ObjectId(text)


def test_a_shared_document_is_projected_once_a_fresh_one_every_time() -> None:
    projected: list[str] = []

    def public(document: dict) -> dict:
        projected.append(document["name"])
        return {"name": document["name"]}

    shared, fresh = SharedDocument({"name": "shared"}), {"name": "fresh"}

    def read(fits: Callable[[dict], bool]) -> tuple[list[dict], int]:
        for document in (shared, fresh):
            fits(document)
        return [shared, fresh], 2

    for _ in range(3):
        page = bounded_page(read, public, 1, 10, 10_000)
        assert page.encoded == ['{"name":"shared"}', '{"name":"fresh"}']
    assert projected == ["shared", "fresh", "fresh", "fresh"]


def test_a_page_read_again_after_a_change_shows_the_change(
        build_app: Callable[..., Flask], auth: Callable[..., dict],
        flow_body: Callable[..., dict]) -> None:
    app = build_app()
    client = app.test_client()
    ids = make_flows(app, auth(), flow_body, 3)
    before = client.get("/flows?sort=name", headers=auth()).get_json()["data"]
    assert client.patch(f"/flows/{ids[1]}", json={"description": "changed"},
                        headers=auth()).status_code == 200
    after = client.get("/flows?sort=name", headers=auth()).get_json()["data"]
    assert [flow["description"] for flow in after] == [
        before[0]["description"], "changed", before[2]["description"]]
    assert after[1]["revision"] == before[1]["revision"] + 1
