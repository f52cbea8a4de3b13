"""Unit tests for flow_repository.domain.flow: graph rules, owners, lifecycle table, public view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from bson import ObjectId

from flow_repository.domain import flow as domain
from flow_repository.domain.flow import (
    Problem,
    Timeouts,
    describe,
    graph_problems,
    is_object_id,
    iso,
    public_flow,
    with_owner,
)


def node(node_id: str) -> dict:
    return {"id": node_id, "componentId": "0" * 24, "function": "f"}


def edge(source: str, target: str) -> dict:
    return {"source": source, "target": target}


def paths(problems: list[Problem]) -> list[str]:
    return [problem.path for problem in problems]


# ----------------------------------------------------------------------------- graph rules


def test_valid_single_node_graph_has_no_problems() -> None:
    assert graph_problems({"nodes": [node("a")]}) == []


def test_valid_chained_graph_has_no_problems() -> None:
    graph = {"nodes": [node("a"), node("b"), node("c")], "edges": [edge("a", "b"), edge("b", "c")]}
    assert graph_problems(graph) == []


def test_empty_node_list_is_a_problem() -> None:
    assert graph_problems({"nodes": []}) == [
        Problem("graph.nodes", "a flow needs at least one node")
    ]


def test_duplicate_node_id_names_both_positions_and_the_value() -> None:
    problems = graph_problems({"nodes": [node("a"), node("b"), node("a")],
                               "edges": [edge("a", "b")]})
    assert problems == [
        Problem("graph.nodes[2].id", "duplicate node id 'a' (also graph.nodes[0])")
    ]


def test_several_nodes_without_edges_is_a_problem() -> None:
    assert paths(graph_problems({"nodes": [node("a"), node("b")]})) == ["graph.edges"]
    assert paths(graph_problems({"nodes": [node("a"), node("b")], "edges": []})) == [
        "graph.edges"
    ]


def test_edge_ends_must_name_existing_nodes() -> None:
    problems = graph_problems({"nodes": [node("a"), node("b")],
                               "edges": [edge("a", "ghost"), edge("nobody", "b")]})
    assert problems == [
        Problem("graph.edges[0].target", "'ghost' does not name a node of this flow"),
        Problem("graph.edges[1].source", "'nobody' does not name a node of this flow"),
    ]


def test_every_graph_problem_is_reported_at_once() -> None:
    problems = graph_problems({"nodes": [node("a"), node("a"), node("b")],
                               "edges": [edge("a", "x")]})
    assert paths(problems) == ["graph.nodes[1].id", "graph.edges[0].target"]


def test_graph_rules_skip_items_the_schema_reports() -> None:
    # Non-object nodes and ids that are not strings are type errors reported by the schema.
    graph = {"nodes": ["junk", {"id": 5}, {"id": 5}, node("a")],
             "edges": [7, {"source": 1, "target": "a"}]}
    assert graph_problems(graph) == []


def test_single_node_needs_no_edges() -> None:
    assert graph_problems({"nodes": [node("only")], "edges": []}) == []


# ----------------------------------------------------------------------------- owners


def test_with_owner_adds_a_missing_owner_once() -> None:
    owners = [{"id": "other", "type": "user"}]
    result = with_owner(owners, "me", "user")
    assert result == [{"id": "other", "type": "user"}, {"id": "me", "type": "user"}]
    assert with_owner(result, "me", "user") == result


def test_with_owner_keeps_an_existing_owner_of_any_type() -> None:
    owners = [{"id": "me", "type": "tenant"}]
    assert with_owner(owners, "me", "user") == [{"id": "me", "type": "tenant"}]


def test_with_owner_does_not_modify_its_input() -> None:
    owners = [{"id": "other", "type": "user"}]
    with_owner(owners, "me", "user")
    assert owners == [{"id": "other", "type": "user"}]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("value", ["0" * 24, "abcdefABCDEF012345678901", str(ObjectId())])
def test_object_id_accepts_24_hex_digits(value: str) -> None:
    assert is_object_id(value)


@pytest.mark.parametrize("value", ["0" * 23, "0" * 25, "g" * 24, "", None, 5, ObjectId(),
                                   "0" * 24 + "\n"])
def test_object_id_rejects_anything_else(value: object) -> None:
    assert not is_object_id(value)


def test_describe_shows_short_values_whole_and_truncates_long_ones() -> None:
    assert describe("abc") == "'abc'"
    long = describe("x" * 500)
    assert len(long) == 60
    assert long.endswith("...")


def test_iso_writes_utc_with_milliseconds_and_z() -> None:
    moment = datetime(2024, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    assert iso(moment) == "2024-03-04T05:06:07.891Z"


def test_iso_converts_other_time_zones_to_utc() -> None:
    moment = datetime(2024, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    assert iso(moment) == "2024-03-04T05:06:07.000Z"


def test_public_flow_renames_id_formats_dates_and_drops_internal_fields() -> None:
    flow_id = ObjectId()
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    document = {
        "_id": flow_id, "name": "n", "status": "starting", "createdAt": moment,
        "updatedAt": moment, "revision": 3, "outbox": [{"name": "x"}], "deletedAt": None,
        "statusRetries": 1, "startedBy": "u", "relayLeaseUntil": moment,
        "relayLeaseOwner": "relay",
    }
    assert public_flow(document) == {
        "id": str(flow_id), "name": "n", "status": "starting",
        "createdAt": "2024-01-02T03:04:05.000Z", "updatedAt": "2024-01-02T03:04:05.000Z",
        "revision": 3,
    }


# ----------------------------------------------------------------------------- lifecycle


# The transition table itself is checked through the service and API in test_lifecycle.py.


@pytest.mark.parametrize("status", [domain.INACTIVE, domain.ACTIVE])
def test_timeouts_leave_settled_flows_alone(status: str) -> None:
    assert Timeouts(1, 1).plan(status, 0) is None


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("error", "status"), [
    (domain.InvalidFlow, 400), (domain.Forbidden, 403), (domain.FlowNotFound, 404),
    (domain.Conflict, 409), (domain.PreconditionFailed, 412),
])
def test_each_error_carries_its_http_status(error: type[domain.FlowError], status: int) -> None:
    assert error("x").status == status


def test_error_messages_list_problems_or_fall_back_to_the_message() -> None:
    assert domain.InvalidFlow("bad").messages() == ["bad"]
    error = domain.InvalidFlow("bad", [Problem("name", "too long"), Problem("", "whole body")])
    assert error.messages() == ["name: too long", "whole body"]
