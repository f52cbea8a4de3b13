"""RequestBuffer: when the API worker's event loop has a whole request to hand to a thread."""

from __future__ import annotations

import pytest

from flow_repository.server.gunicorn_worker import RequestBuffer, error_bytes, stream_request

HEAD = b"POST /flows HTTP/1.1\r\nHost: x\r\n"


def fed(*pieces: bytes, max_head: int = 1024, max_body: int = 100) -> RequestBuffer:
    buffer = RequestBuffer(max_head, max_body)
    for piece in pieces:
        buffer.feed(piece)
    return buffer


def byte_by_byte(data: bytes, **limits: int) -> list[str]:
    buffer = RequestBuffer(limits.get("max_head", 1024), limits.get("max_body", 100))
    return [buffer.feed(data[index:index + 1]) for index in range(len(data))]


def test_a_bodiless_request_is_complete_at_the_blank_line() -> None:
    verdicts = byte_by_byte(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert verdicts[-1] == "complete"
    assert set(verdicts[:-1]) == {"incomplete"}


def test_a_content_length_body_is_complete_when_all_of_it_arrived() -> None:
    verdicts = byte_by_byte(HEAD + b"Content-Length: 5\r\n\r\n{\"a\"}")
    assert verdicts[-1] == "complete" and set(verdicts[:-1]) == {"incomplete"}


def test_a_chunked_body_is_complete_after_its_last_chunk_and_trailers() -> None:
    message = (HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\n0\r\n\r\n\r\n3\r\nabc\r\n0\r\n\r\n")  # "0\r\n\r\n" inside a chunk
    verdicts = byte_by_byte(message)
    assert verdicts[-1] == "complete" and set(verdicts[:-1]) == {"incomplete"}
    with_trailer = HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: 1\r\n\r\n"
    verdicts = byte_by_byte(with_trailer)
    assert verdicts[-1] == "complete" and set(verdicts[:-1]) == {"incomplete"}


@pytest.mark.parametrize("head", [
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: \xc2\xb2\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
])
def test_framing_gunicorn_refuses_is_handed_over_at_once(head: bytes) -> None:
    # gunicorn's parser answers 400 from the head alone, so no thread waits for a body.
    assert fed(HEAD + head + b"\r\n").verdict == "complete"


@pytest.mark.parametrize("size_line", [b"-3E8", b"0x10", b"+1", b"1_0", b"g", b"", b"1" * 16])
def test_a_malformed_chunk_size_is_a_bad_request(size_line: bytes) -> None:
    message = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n" + b"x" * 20
    assert fed(message).verdict == "bad request"


def test_a_chunk_size_line_that_never_ends_is_a_bad_request() -> None:
    buffer = fed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1;", max_body=10_000)
    for _ in range(2000):
        buffer.feed(b"e")
    assert buffer.verdict == "bad request"


def test_limits_are_answered_without_waiting() -> None:
    assert fed(b"GET /" + b"a" * 2000, max_head=1024).verdict == "head too large"
    assert fed(HEAD + b"Content-Length: 101\r\n\r\n").verdict == "body too large"
    chunked = fed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"ff\r\n" + b"a" * 30,
                  max_body=100)
    assert chunked.verdict == "body too large"  # announced by its size line
    # Chunks that together stay within the limit, however they arrive, are accepted.
    body = b"".join(b"a\r\n" + b"x" * 10 + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
    verdicts = byte_by_byte(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert verdicts[-1] == "complete" and set(verdicts[:-1]) == {"incomplete"}


def test_expect_100_continue_is_noted_and_not_passed_on() -> None:
    buffer = fed(HEAD + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert buffer.verdict == "incomplete" and buffer.continue_expected
    buffer.feed(b"{}")
    assert buffer.verdict == "complete"
    assert buffer.request_bytes() == HEAD + b"Content-Length: 2\r\n\r\n{}"
    http10 = fed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert not http10.continue_expected


def test_error_answers_are_complete_json_responses() -> None:
    answer = error_bytes(503, "Service Unavailable", "busy", "Retry-After: 5\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"Retry-After: 5" in head and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert body == b'{"errors": [{"message": "busy", "code": 503}]}'


@pytest.mark.parametrize(("head", "stream"), [
    (b"GET /flows/events HTTP/1.1\r\nHost: x", True),
    (b"GET /flows/events/?filter[status]=active HTTP/1.1\r\n", True),
    (b"GET /flows/eventsx HTTP/1.1\r\n", False),
    (b"GET /flows/65f0c1d2e3a4b5c6d7e8f901 HTTP/1.1\r\n", False),
    (b"HEAD /flows/events HTTP/1.1\r\n", False),  # answered at once: a request thread
    (b"POST /flows/events HTTP/1.1\r\n", False),
    (b"GET /flows/events", False),
])
def test_change_streams_are_told_from_other_requests(head: bytes, stream: bool) -> None:
    assert stream_request(head) is stream
