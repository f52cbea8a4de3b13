"""Every number a client writes in a path, a query or a header goes through one strict parser:
arbitrary unicode (superscripts, other scripts' digits, "1_0", signs, spaces) is a 400 in the
error shape, never a 500 (issue 16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow_repository.domain.flow import InvalidFlow, parse_number

# Text a client might send where a number belongs: anything, and the near misses.
NEAR_MISSES = ["\u00b9", "\u00b2", "\u0663", "\uff11", "1_0", " 1", "1 ", "+1", "-1", "0x1",
               "1e3", "1.0", "9" * 19, "9" * 5000, "", "\u0000", "NaN", "\U0001d7d9"]
NUMBERISH = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=8),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.sampled_from(NEAR_MISSES),
)
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def as_header(text: str) -> str:
    """What a WSGI server hands over for a header holding ``text`` (UTF-8 read as latin-1)."""
    return text.replace("\r", "").replace("\n", "").encode("utf-8").decode("latin-1")


def no_server_error(response: Any) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        body = response.get_json()
        assert body and body["errors"][0]["code"] == response.status_code, body


@pytest.fixture
def flow_id(create: Callable[..., dict[str, Any]]) -> str:
    return create()["id"]


@pytest.mark.parametrize("raw", ["\u00b9", "\u0663", "1_0", " 1", "+1", "9" * 101, ""])
def test_the_parser_takes_ascii_digits_only(raw: str) -> None:
    with pytest.raises(InvalidFlow, match="ASCII digits"):
        parse_number(raw, "page[size]")
    assert parse_number("0042", "page[size]") == 42
    with pytest.raises(InvalidFlow, match="revision: must be 1 to 9223372036854775807"):
        parse_number("9" * 19, "revision", minimum=1)  # more than MongoDB can compare
    assert parse_number("9" * 20, "page[size]", maximum=None) == int("9" * 20)  # clamped later


@pytest.mark.parametrize("path", ["/flows/{id}/revisions/%C2%B9", "/flows/{id}/revisions/%D9%A3",
                                  "/flows?page%5Bsize%5D=%C2%B9", "/flows?page%5Bnumber%5D=1_0",
                                  "/flows/{id}/diff?from=%D9%A3",
                                  "/flows/{id}/revisions?page%5Bsize%5D=%EF%BC%91"])
def test_a_unicode_digit_is_a_clear_400(client: FlaskClient, auth: Callable[..., dict],
                                        flow_id: str, path: str,
                                        error_messages: Callable) -> None:
    response = client.get(path.format(id=flow_id), headers=auth())
    [message] = error_messages(response, 400)
    assert "ASCII digits" in message


@PROPERTY
@given(size=NUMBERISH, number=NUMBERISH)
def test_list_paging_never_fails_with_5xx(client: FlaskClient, auth: Callable[..., dict],
                                          size: str, number: str) -> None:
    query = f"page%5Bsize%5D={quote(size, safe='')}&page%5Bnumber%5D={quote(number, safe='')}"
    no_server_error(client.get(f"/flows?{query}", headers=auth()))


@PROPERTY
@given(revision=NUMBERISH, size=NUMBERISH, number=NUMBERISH, source=NUMBERISH, target=NUMBERISH)
def test_history_numbers_never_fail_with_5xx(client: FlaskClient, auth: Callable[..., dict],
                                             flow_id: str, revision: str, size: str,
                                             number: str, source: str, target: str) -> None:
    headers = auth()
    no_server_error(client.get(f"/flows/{flow_id}/revisions/{quote(revision, safe='')}",
                               headers=headers))
    no_server_error(client.get(
        f"/flows/{flow_id}/revisions?page%5Bsize%5D={quote(size, safe='')}"
        f"&page%5Bnumber%5D={quote(number, safe='')}", headers=headers))
    no_server_error(client.get(f"/flows/{flow_id}/diff?from={quote(source, safe='')}"
                               f"&to={quote(target, safe='')}", headers=headers))


@PROPERTY
@given(tag=NUMBERISH, quoted=st.booleans(), raw_id=st.one_of(NUMBERISH, st.just("")))
def test_if_match_and_path_ids_never_fail_with_5xx(client: FlaskClient,
                                                   auth: Callable[..., dict], flow_id: str,
                                                   tag: str, quoted: bool, raw_id: str) -> None:
    headers = {**auth(), "If-Match": as_header(f'"{tag}"' if quoted else tag)}
    no_server_error(client.patch(f"/flows/{flow_id}", json={"description": "x"},
                                 headers=headers))
    no_server_error(client.post(f"/flows/{flow_id}/restore", json={"revision": 1},
                                headers=headers))
    no_server_error(client.delete(f"/flows/{quote(raw_id, safe='')}", headers=headers))
    encoded = quote(raw_id, safe="") or "x"
    for path in (f"/flows/{encoded}", f"/flows/{encoded}/revisions",
                 f"/flows/{encoded}/revisions/{encoded}", f"/flows/{encoded}/steps/s/logs"):
        no_server_error(client.get(path, headers=auth()))
    no_server_error(client.post(f"/flows/{encoded}/start", headers=auth()))
