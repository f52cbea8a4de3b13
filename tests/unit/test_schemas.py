"""Unit tests for flow_repository.contract.schemas: flow validation, free-form JSON limits, list queries."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from marshmallow import ValidationError

from flow_repository.contract.schemas import (
    JSON_MAX_DEPTH,
    ListArgumentsSchema,
    json_problems,
    list_query,
    validate_flow,
)
from flow_repository.domain.flow import InvalidFlow

COMPONENT = "5f3e2d1c0b9a887766554433"
STATUS_MESSAGE = ("status: must be the flow's current status, inactive: use "
                  "/flows/{id}/start or /stop to change it (got 'active')")


def node(node_id: str = "a", **extra: Any) -> dict:
    return {"id": node_id, "componentId": COMPONENT, "function": "run", **extra}


def body(**extra: Any) -> dict:
    return {"name": "flow", "graph": {"nodes": [node()]}, **extra}


def problems(candidate: Any, *, partial: bool = False) -> list[str]:
    """The messages validate_flow reports for ``candidate`` (it must refuse it)."""
    with pytest.raises(InvalidFlow) as caught:
        validate_flow(candidate, partial=partial)
    return caught.value.messages()


def nested(depth: int) -> dict:
    """``depth`` nested objects around a scalar: nested(2) == {"k": {"k": 1}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


# ----------------------------------------------------------------------------- flows


def test_valid_flow_comes_back_clean() -> None:
    full = body(description="d", type="ordinary", cron="*/5 * * * *",
                fromTemplate=COMPONENT, flowSettings={"a": 1},
                owners=[{"id": "u", "type": "user"}])
    full["graph"]["nodes"][0].update(credentials_id=COMPONENT, name="n", description="d",
                                     fields={"x": [1, {"y": None}]}, nodeSettings={"z": True})
    assert validate_flow(copy.deepcopy(full)) == (full, [])


def test_graph_is_required() -> None:
    assert problems({"name": "x"}) == ["graph: Missing data for required field"]


def test_node_required_fields_are_each_reported() -> None:
    assert problems({"graph": {"nodes": [{}]}}) == [
        "graph.nodes[0].id: Missing data for required field",
        "graph.nodes[0].componentId: Missing data for required field",
        "graph.nodes[0].function: Missing data for required field",
    ]


def test_node_id_may_have_30_characters_but_not_31() -> None:
    validate_flow(body(graph={"nodes": [node("x" * 30)]}))
    assert problems(body(graph={"nodes": [node("x" * 31)]})) == [
        f"graph.nodes[0].id: Length must be between 1 and 30 (got '{'x' * 31}')"
    ]


@pytest.mark.parametrize(("field", "path"), [
    ("componentId", "graph.nodes[0].componentId"),
    ("credentials_id", "graph.nodes[0].credentials_id"),
])
def test_node_references_must_be_object_ids(field: str, path: str) -> None:
    candidate = body(graph={"nodes": [node(**{field: "not-an-id"})]})
    assert problems(candidate) == [f"{path}: is not a valid ObjectId (got 'not-an-id')"]


def test_from_template_must_be_an_object_id() -> None:
    assert problems(body(fromTemplate="123")) == [
        "fromTemplate: is not a valid ObjectId (got '123')"
    ]


def test_object_id_with_a_trailing_newline_is_refused() -> None:
    assert problems(body(fromTemplate="0" * 24 + "\n")) == [
        f"fromTemplate: is not a valid ObjectId (got '{'0' * 24}\\n')"
    ]


@pytest.mark.parametrize("cron", ["* * * * *", "0 3 * * 1-5", "*/15 * * * * 30"])
def test_valid_cron_expressions_are_accepted(cron: str) -> None:
    assert validate_flow(body(cron=cron))[0]["cron"] == cron


@pytest.mark.parametrize("cron", ["every day", "61 * * * *", "* * *", "", "* " * 60])
def test_invalid_cron_expressions_are_refused(cron: str) -> None:
    [message] = problems(body(cron=cron))
    assert message.startswith("cron: is not a valid cron expression (got ")


def test_owners_need_id_and_type() -> None:
    assert problems(body(owners=[{"id": "u"}, {"type": "user"}])) == [
        "owners[0].type: Missing data for required field",
        "owners[1].id: Missing data for required field",
    ]


def test_edges_need_source_and_target() -> None:
    graph = {"nodes": [node("a"), node("b")], "edges": [{"id": "e"}]}
    assert problems(body(graph=graph)) == [
        "graph.edges[0].source: Missing data for required field",
        "graph.edges[0].target: Missing data for required field",
    ]


def test_every_problem_is_reported_at_once_with_path_and_value() -> None:
    candidate = {
        "status": "active",
        "cron": "nope",
        "fromTemplate": "x",
        "owners": [{"id": "u"}],
        "graph": {"nodes": [node("a", componentId="zz"), node("a")],
                  "edges": [{"source": "a", "target": "ghost"}]},
    }
    assert sorted(problems(candidate)) == sorted([
        STATUS_MESSAGE,
        "cron: is not a valid cron expression (got 'nope')",
        "fromTemplate: is not a valid ObjectId (got 'x')",
        "owners[0].type: Missing data for required field",
        "graph.nodes[0].componentId: is not a valid ObjectId (got 'zz')",
        "graph.nodes[1].id: duplicate node id 'a' (also graph.nodes[0])",
        "graph.edges[0].target: 'ghost' does not name a node of this flow",
    ])


def test_a_status_equal_to_the_current_one_is_ignored() -> None:
    assert validate_flow(body(status="inactive")) == (body(), [])
    assert validate_flow(body(status="active"), status="active") == (body(), [])


@pytest.mark.parametrize("status", ["active", "stopping", "", None, 1])
def test_a_status_other_than_the_current_one_is_refused(status: Any) -> None:
    assert problems(body(status=status)) == [STATUS_MESSAGE.replace("'active'", repr(status))]


def test_status_none_leaves_the_status_check_to_the_caller() -> None:
    assert validate_flow({"status": "active"}, partial=True, status=None) == ({}, [])


def test_unknown_fields_are_dropped_at_every_level_of_the_structure() -> None:
    candidate = body(extra=1, **{"description:": "mistyped key"})
    candidate["graph"]["nodes"][0].update(privileged=True, authorization={"a": 1})
    candidate["graph"]["shape"] = "round"
    candidate["graph"]["edges"] = [{"source": "a", "target": "a", "weight": 2,
                                    "config": {"mapper": {"kept": 1}, "lang": "jsonata"}}]
    candidate["owners"] = [{"id": "u", "type": "user", "role": "x"}]
    clean, dropped = validate_flow(candidate)
    assert sorted(dropped) == sorted([
        "extra", "description:", "graph.nodes[0].privileged", "graph.nodes[0].authorization",
        "graph.shape", "graph.edges[0].weight", "graph.edges[0].config.lang",
        "owners[0].role",
    ])
    assert clean == body(graph={"nodes": [node()], "edges": [
        {"source": "a", "target": "a", "config": {"mapper": {"kept": 1}}}]},
        owners=[{"id": "u", "type": "user"}])


def test_free_form_objects_keep_every_key() -> None:
    candidate = body(flowSettings={"anything": {"deep": 1}})
    candidate["graph"]["nodes"][0].update(fields={"x": {"y": 1}}, nodeSettings={"z": [1]})
    candidate["graph"]["edges"] = [{"source": "a", "target": "a",
                                    "config": {"mapper": {"$.a": {"b": 1}}}}]
    clean, dropped = validate_flow(copy.deepcopy(candidate))
    assert (clean, dropped) == (candidate, [])


def test_known_fields_stay_strict_next_to_dropped_ones() -> None:
    candidate = body(extra=1)
    candidate["graph"]["nodes"][0].update(privileged=True, componentId="nope")
    assert problems(candidate) == [
        "graph.nodes[0].componentId: is not a valid ObjectId (got 'nope')"]


def test_wrongly_typed_structures_are_reported_not_dropped() -> None:
    assert problems(body(graph="a graph")) == ["graph: Invalid input type (got 'a graph')"]
    assert "graph.nodes[0]: Invalid input type (got 'n')" in problems(body(graph={"nodes": ["n"]}))


def test_read_only_fields_are_dropped_without_being_reported() -> None:
    candidate = body(id="x", _id="y", createdAt="c", updatedAt="u", revision=9, tenant="t",
                     statusChangedAt="s", statusReason="r")
    assert validate_flow(candidate) == (body(), [])


@pytest.mark.parametrize("value", ["text", 5, None, [body()]])
def test_body_must_be_an_object(value: Any) -> None:
    [message] = problems(value)
    assert message.startswith("the body must be a JSON object (got ")


def test_partial_body_checks_only_the_fields_present() -> None:
    assert validate_flow({"name": "renamed"}, partial=True) == ({"name": "renamed"}, [])
    assert problems({"name": 5}, partial=True) == ["name: Not a valid string (got 5)"]


def test_partial_body_still_applies_the_graph_rules() -> None:
    graph = {"nodes": [node("a"), node("b")]}
    assert problems({"graph": graph}, partial=True) == [
        "graph.edges: a flow with more than one node needs edges"
    ]


def test_edge_mapper_may_be_a_string_or_an_object() -> None:
    graph = {"nodes": [node("a"), node("b")],
             "edges": [{"source": "a", "target": "b", "config": {"mapper": "$.x"}},
                       {"source": "b", "target": "a", "config": {"mapper": {"$.y": 1}}}]}
    assert validate_flow(body(graph=graph))[0]["graph"] == graph


# ----------------------------------------------------------------------------- free-form JSON


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0, 1.5, True, None, "x"])
def test_int64_range_and_other_scalars_are_storable(value: Any) -> None:
    assert json_problems({"list": [value]}) == []


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_integers_beyond_int64_are_not_storable(value: int) -> None:
    assert json_problems({"a": [value]}) == [f"integer {value!r} exceeds 64 bits"]


def test_nesting_up_to_the_limit_is_storable_and_one_more_is_not() -> None:
    assert json_problems(nested(JSON_MAX_DEPTH)) == []
    assert json_problems(nested(JSON_MAX_DEPTH + 1)) == [
        f"nested deeper than {JSON_MAX_DEPTH} levels"
    ]


@pytest.mark.parametrize("field", ["flowSettings", "fields", "nodeSettings", "mapper"])
def test_free_form_objects_refuse_big_integers_and_deep_nesting(field: str) -> None:
    for bad in ({"n": 2**64}, nested(JSON_MAX_DEPTH + 1)):
        candidate = body(graph={"nodes": [node("a"), node("b")],
                                "edges": [{"source": "a", "target": "b", "config": {}}]})
        where = {
            "flowSettings": (candidate, "flowSettings"),
            "fields": (candidate["graph"]["nodes"][0], "fields"),
            "nodeSettings": (candidate["graph"]["nodes"][0], "nodeSettings"),
            "mapper": (candidate["graph"]["edges"][0]["config"], "mapper"),
        }[field]
        where[0][where[1]] = bad
        [message] = problems(candidate)
        assert ("exceeds 64 bits" in message) or ("nested deeper than" in message), message


def test_free_form_objects_accept_keys_mongodb_cannot_hold() -> None:
    settings = {"$where": 1, "a.b": {"~": [{"$in": "\x00"}]}, "nul\x00": None}
    assert validate_flow(body(flowSettings=settings))[0]["flowSettings"] == settings


# ----------------------------------------------------------------------------- list arguments


def load_arguments(raw: dict[str, str]) -> dict[str, Any]:
    return ListArgumentsSchema().load(raw)


def test_list_arguments_default_to_first_page_of_ten_by_creation() -> None:
    query = list_query(max_page_size=1000, arguments=load_arguments({}))
    assert (query.page_size, query.page_number) == (10, 1)
    assert (query.sort_field, query.sort_descending) == ("createdAt", False)
    assert (query.status, query.type, query.user, query.from_template, query.search) == (
        None, None, None, None, None)


@pytest.mark.parametrize(("sort", "field", "descending"), [
    ("name", "name", False), ("-name", "name", True), ("updatedAt", "updatedAt", False),
    ("-createdAt", "createdAt", True),
])
def test_sort_argument_names_field_and_direction(sort: str, field: str, descending: bool) -> None:
    query = list_query(max_page_size=1000, arguments=load_arguments({"sort": sort}))
    assert (query.sort_field, query.sort_descending) == (field, descending)


def test_list_arguments_are_carried_into_the_query() -> None:
    query = list_query(max_page_size=1000, arguments=load_arguments({
        "page[size]": "1000", "page[number]": "3", "filter[status]": "active",
        "filter[type]": "ordinary", "filter[user]": "u", "filter[fromTemplate]": COMPONENT,
        "search": "a.*b",
    }))
    assert (query.page_size, query.page_number, query.status, query.type, query.user,
            query.from_template, query.search) == (1000, 3, "active", "ordinary", "u",
                                                   COMPONENT, "a.*b")


@pytest.mark.parametrize(("size", "used"), [("1", 1), ("999", 999), ("1000", 1000),
                                            ("1001", 1000), ("99999999999999999999", 1000)])
def test_page_size_above_the_maximum_is_clamped(size: str, used: int) -> None:
    assert list_query(load_arguments({"page[size]": size}), max_page_size=1000).page_size == used


@pytest.mark.parametrize(("raw", "status"), [("1", "active"), ("0", "inactive"),
                                             ("active", "active"), ("stopping", "stopping")])
def test_status_filter_takes_oih_codes_and_names(raw: str, status: str) -> None:
    query = list_query(load_arguments({"filter[status]": raw}), max_page_size=1000)
    assert query.status == status


@pytest.mark.parametrize("raw", [
    {"page[size]": "0"}, {"page[size]": "-1"}, {"page[size]": "abc"}, {"page[size]": "2.5"},
    {"page[number]": "0"}, {"filter[status]": "running"}, {"filter[status]": "2"}, {"filter[fromTemplate]": "xyz"}, {"sort": "owner"},
    {"sort": "+name"}, {"search": "s" * 201},
])
def test_out_of_range_list_arguments_are_refused(raw: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as caught:
        load_arguments(raw)
    assert set(caught.value.messages) == set(raw)


def test_search_of_exactly_200_characters_is_accepted() -> None:
    assert load_arguments({"search": "s" * 200})["search"] == "s" * 200
