"""The flow id and If-Match header a client or an event sends, parsed into what the rules use."""

from __future__ import annotations

import re
from typing import Any

from bson import ObjectId

from flow_repository.domain import flow as domain
from flow_repository.domain.flow import InvalidFlow, describe


def parse_flow_id(raw: Any) -> ObjectId:
    """The ObjectId a client or an event names; InvalidFlow (400) when it is malformed."""
    if not domain.is_object_id(raw):
        raise InvalidFlow(f"invalid flow id {describe(raw)}: expected 24 hexadecimal digits")
    return ObjectId(raw)



REVISION_TAG = re.compile(r'"([^"]*)"')  # the number inside goes through parse_number


def parse_if_match(header: str | None) -> tuple[int, ...] | None:
    """The revisions an If-Match header accepts; None when absent or ``*``.

    Only ``*`` or a list of strong entity tags holding a revision number (``"3"``) can
    match. Strong comparison, as RFC 9110 requires for If-Match: weak tags (``W/"3"``),
    unquoted or non-ASCII digits and anything else match nothing, so a header holding only
    those fails with 412 (never 500).
    """
    if header is None or header.strip() == "*":
        return None
    revisions = []
    for tag in header.split(","):
        matched = REVISION_TAG.fullmatch(tag.strip())
        if matched:
            try:
                revisions.append(domain.parse_number(matched.group(1), "If-Match"))
            except InvalidFlow:
                continue  # a tag that is no revision number matches nothing
    if not revisions:
        raise domain.PreconditionFailed(f"If-Match {describe(header)} names no revision "
                                        "of this flow")
    return tuple(revisions)
