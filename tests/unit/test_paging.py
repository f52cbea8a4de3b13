"""Bounded list answers: MAX_LIST_BYTES cuts a page short in a way paging continues from."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flow_repository.domain.paging import page_meta, page_size_within

BLOB = 12_000  # bytes of free-form data per flow
BUDGET = 4 * BLOB + 4_000  # room for four such flows, not five


@pytest.mark.parametrize(("sizes", "offset", "expected"), [
    ([10] * 10, 0, 10),  # everything fits
    ([10] * 3, 20, 10),  # a short last page that fits keeps the requested size
    ([30] * 10, 0, 3),  # 100 bytes take three
    ([30] * 10, 10, 2),  # three fit, but a page of 3 cannot start at offset 10
    ([30] * 10, 7, 1),
    ([500, 10], 0, 1),  # the first item is answered whatever its size
])
def test_page_size_within_the_budget(sizes: list[int], offset: int, expected: int) -> None:
    assert page_size_within(sizes, offset, 10, 100) == expected


def test_page_meta_says_when_the_page_was_cut() -> None:
    assert page_meta(25, 10, 10, 10) == {"total": 25, "page": 2, "perPage": 10, "totalPages": 3}
    assert page_meta(25, 10, 2, 10) == {"total": 25, "page": 6, "perPage": 2, "totalPages": 13,
                                        "truncated": True}


def test_large_flows_are_answered_in_bounded_pages_that_page_on(
    build_app, auth: Callable[..., dict[str, str]], flow_body: Callable[..., dict]
) -> None:
    client = build_app(max_list_bytes=BUDGET).test_client()
    created = []
    for index in range(10):
        body = flow_body(name=f"flow {index}")
        body["graph"]["nodes"][0]["fields"] = {"blob": "x" * BLOB}
        response = client.post("/flows", json=body, headers=auth())
        assert response.status_code == 201
        created.append(response.get_json()["data"]["id"])

    first = client.get("/flows?page[size]=10", headers=auth())
    assert first.status_code == 200
    assert len(first.get_data()) < BUDGET + 2_000
    assert first.get_json()["meta"] == {"total": 10, "page": 1, "perPage": 4, "totalPages": 3,
                                        "truncated": True}
    # Following meta (page + 1 at perPage) visits every flow once, in order.
    seen, page, size = [], 1, 10
    while True:
        answer = client.get(f"/flows?page[size]={size}&page[number]={page}", headers=auth())
        assert len(answer.get_data()) < BUDGET + 2_000
        meta = answer.get_json()["meta"]
        seen.extend(flow["id"] for flow in answer.get_json()["data"])
        if meta["page"] >= meta["totalPages"]:
            break
        page, size = meta["page"] + 1, meta["perPage"]
    assert seen == created


def test_small_flows_are_not_cut(client, create, auth: Callable[..., dict[str, str]]) -> None:
    for _ in range(3):
        create()
    meta = client.get("/flows", headers=auth()).get_json()["meta"]
    assert meta == {"total": 3, "page": 1, "perPage": 10, "totalPages": 1}
