"""Pure paging rule: cut a page of flows short when its answer would exceed a byte budget."""

from __future__ import annotations

import math
from collections.abc import Sequence


def clamp_page_size(requested: int, maximum: int) -> int:
    """``page[size]`` above the configured maximum is clamped to it, never refused (OIH's
    clients ask for 1000); meta.perPage then tells the size used. Every list uses this."""
    return min(requested, maximum)


def page_size_within(sizes: Sequence[int], offset: int, page_size: int, budget: int) -> int:
    """The page size to answer with so that the page's items fit in ``budget`` bytes.

    ``sizes`` are the encoded sizes of the items of the page that starts at ``offset``. When
    they all fit, the requested ``page_size`` stands. Otherwise the answer is a smaller page
    that starts at the same offset, so that ``page[number]``/``page[size]`` paging goes on
    from it: its size is the largest that fits and divides ``offset``. The first item is
    always answered, whatever its size (one flow is bounded by MAX_BODY_BYTES).
    """
    fitting, used = 0, 0
    for size in sizes:
        if fitting and used + size > budget:
            break
        used += size
        fitting += 1
    if fitting == len(sizes):
        return page_size
    return next(size for size in range(fitting, 0, -1) if offset % size == 0)


def page_meta(total: int, offset: int, page_size: int,
              requested_size: int) -> dict[str, int | bool]:
    """The list ``meta`` of the page of ``page_size`` items starting at ``offset``."""
    meta: dict[str, int | bool] = {
        "total": total,
        "page": offset // page_size + 1,
        "perPage": page_size,
        "totalPages": math.ceil(total / page_size),
    }
    if page_size < requested_size:
        meta["truncated"] = True  # cut short by MAX_LIST_BYTES; page on with perPage
    return meta
