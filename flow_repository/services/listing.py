"""One page of any list (flows, history entries), cut to the bytes one answer may hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from flow_repository.adapters.store.base import Fits, SharedDocument
from flow_repository.contract import json_text
from flow_repository.domain import paging


class Page(NamedTuple):
    """A page of a list: its ``meta``, and its public items as the JSON text each was
    measured by (:func:`~flow_repository.contract.json_text`), so the answer need not
    encode them a second time."""

    meta: dict[str, Any]
    encoded: list[str]


def bounded_page(read: Callable[[Fits], tuple[list[dict], int]],
                 public: Callable[[dict], dict], page_number: int, page_size: int,
                 max_list_bytes: int) -> Page:
    """One page of any list, read no further than ``max_list_bytes`` of answer.

    ``read(fits)`` is the store call; ``fits`` turns each stored document into its public
    form as it is read, keeps it and measures it, and stops the read once the budget is
    spent, so the page is never held whole before it is cut (paging.page_size_within).
    """
    encoded: list[str] = []
    sizes: list[int] = []

    def fits(document: dict) -> bool:
        encoded.append(text := public_text(document, public))
        sizes.append(len(text))
        return len(sizes) == 1 or sum(sizes) <= max_list_bytes

    _, total = read(fits)
    offset = (page_number - 1) * page_size
    size = paging.page_size_within(sizes, offset, page_size, max_list_bytes)
    return Page(paging.page_meta(total, offset, size, page_size), encoded[:size])


def public_text(document: dict, public: Callable[[dict], dict]) -> str:
    """``json_text(public(document))``, derived once per stored state of a shared document."""
    if not isinstance(document, SharedDocument):
        return json_text(public(document))
    text = document.projections.get(public)
    if text is None:
        text = document.projections[public] = json_text(public(document))
    return text
