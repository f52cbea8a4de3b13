"""Bulk requests: one use case applied to every item, one failure stopping no other."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flow_repository.domain.flow import FlowError, InvalidFlow

from .results import ItemResult, Saved


def check_bulk_size(items: Sequence[Any], max_items: int) -> None:
    if not items:
        raise InvalidFlow("the list of items is empty")
    if len(items) > max_items:
        raise InvalidFlow(f"at most {max_items} items per request (got {len(items)})")


def each(items: Sequence[Any], success: int, apply: Callable[[Any], Mapping[str, Any] | Saved],
         max_items: int) -> list[ItemResult]:
    """Apply a use case to every item of a bulk request; one failure stops no other."""
    check_bulk_size(items, max_items)
    results = []
    for index, item in enumerate(items):
        try:
            outcome = apply(item)
            saved = outcome if isinstance(outcome, Saved) else Saved(dict(outcome))
            results.append(ItemResult(success, index, saved.flow,
                                      ignored_fields=saved.ignored_fields))
        except FlowError as error:
            results.append(ItemResult(error.status, index, errors=error.messages()))
    return results
