"""The API's gunicorn worker: gthread, but a request is read in full before a thread serves it,
and the errors gunicorn raises itself are answered in the JSON error shape.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives and
the thread then reads the rest with no timeout, so a few clients that send one byte and go
quiet hold every thread (issue 9). Here the worker's event loop reads each request (head and
body) without blocking, and only a complete request reaches the thread pool: slow or idle
clients cost a socket and a buffer, never a thread, up to ``worker_connections`` connections
per worker. A request not received in full within ``GUNICORN_REQUEST_TIMEOUT`` seconds is
answered 408 and closed (a connection that sent nothing is just closed). Memory stays
bounded too: a head may take ``MAX_HEAD_BYTES`` (431 beyond), a body ``MAX_BODY_BYTES``
(413), and all the requests a worker is still receiving ``BUFFER_BUDGET_BODIES`` bodies'
worth together (503 for the connection that would go beyond). Everything else (threads,
keep-alive, graceful shutdown, the relay and pika threads of the process) is gthread's,
unchanged: nothing is monkey-patched.

Change streams (issue 20): ``GET /flows/events`` holds its connection for minutes. Such a
request is served by a thread pool of its own (``MAX_WATCHERS`` threads and a few spare for
quick refusals), never by the request threads, so open streams cannot starve the other
requests; on SIGTERM every stream is told to end, so the graceful shutdown is not held up.

Connection slots (issue 16): ``worker_connections`` bounds the API's connections, but the
listeners stay open when they are all taken, and a new connection then gets a quick 503 with
Retry-After instead of waiting unanswered in the kernel's backlog. With ``HEALTH_PORT`` set,
a second listener serves /livez, /readyz and /healthcheck only, from slots of its own
(``HEALTH_CONNECTIONS``), so slow clients of the API port can never starve the kubelet's probes.
"""

from __future__ import annotations

import errno
import json
import re
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.workers.gthread import TConn, ThreadWorker

from flow_repository.contract import error_body

DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_BODY = 1024 * 1024
RECV_SIZE = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line and header fields together, as a proxy would allow
MAX_CHUNK_LINE = 1024  # a chunk-size line, extensions included
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")  # int(..., 16) alone would take "-1", "0x1"
BUFFER_BUDGET_BODIES = 64  # requests being received by one worker hold at most this many bodies
REFUSED = "refused by the HTTP server before reaching the application"
HEALTH_CONNECTIONS = 16  # connections the health listener holds at once, beside the API's
HEALTH_PATHS = frozenset({b"/livez", b"/readyz", b"/healthcheck"})
STREAM_PATHS = frozenset({b"/flows/events"})
STREAM_SPARE_THREADS = 4  # beyond MAX_WATCHERS: a stream over the bound is refused quickly
STEP_BACK_SECONDS = 0.002  # a busy worker leaves a new connection to the others this long


def error_bytes(status: int, reason: str, message: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 answer in the service's error shape; the connection then closes."""
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML error page."""

    def __init__(self, real: socket.socket) -> None:
        self._real = real
        self.written = b""

    def gettimeout(self) -> float:
        return 0.0  # gunicorn then writes at once, without touching the real socket

    def sendall(self, data: bytes) -> None:
        self.written += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class JsonErrorWorker(ThreadWorker):
    """A request gunicorn refuses before the application sees it (request line over
    ``limit_request_line``: 414, malformed request: 400, too many or too large headers: 431,
    ...) is answered ``{"errors": [{"message", "code"}]}`` instead of gunicorn's HTML page.

    gunicorn decides the status, writes the access log and its own warning as usual; only
    the bytes on the wire change. The message is the reason phrase alone: gunicorn's detail
    can quote the offending header, credentials included.
    """

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        capture = _Capture(client)
        super().handle_error(req, capture, addr, exc)
        status_line = capture.written.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            return  # gunicorn wrote nothing it could send either
        status, reason = int(parts[1]), parts[2]
        message = "Internal server error." if status >= 500 and status != 501 else \
            f"{reason}: {REFUSED}."
        try:
            util.write_nonblock(client, error_bytes(status, reason, message))
        except Exception:  # noqa: BLE001 - the client may be gone; gunicorn ignores it too
            self.log.debug("Failed to send error message.")


@dataclass
class RequestBuffer:
    """The bytes of one HTTP/1.x request as they arrive, and whether it is complete.

    Only framing is looked at (Content-Length, chunked); a head gunicorn would refuse is
    reported complete, so that gunicorn's own parser answers it (it does so from the head
    alone, without waiting for a body).
    """

    max_head: int
    max_body: int
    data: bytearray = field(default_factory=bytearray)
    head_scanned: int = 0  # the head's end is not before this index
    head_end: int = -1  # index just past the blank line ending the head
    body_length: int | None = None  # Content-Length, when the body has one
    chunked: bool = False
    chunk_position: int = 0  # next chunk-size line to look at
    chunked_length: int = 0  # sum of the chunk sizes seen so far
    trailers_scanned: int = -1  # after the last chunk: the trailers' end is not before this
    continue_expected: bool = False
    # incomplete | complete | bad request | head too large | body too large
    verdict: str = "incomplete"

    def feed(self, data: bytes) -> str:
        self.data += data
        if self.head_end < 0:
            # Only the new bytes (and three before them) are searched: a client sending one
            # byte at a time must not make every read rescan the whole head.
            end = self.data.find(b"\r\n\r\n", self.head_scanned, self.max_head + 4)
            if end < 0:
                self.head_scanned = max(0, len(self.data) - 3)
                if len(self.data) > self.max_head:
                    self.verdict = "head too large"
                return self.verdict
            self.head_end = end + 4
            self._read_head(bytes(self.data[:end]))
            if self.verdict != "incomplete":
                return self.verdict
        self.verdict = self._body_verdict()
        return self.verdict

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        lengths, encodings, expect = [], [], []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                encodings.append(value.strip().lower())
            elif name == b"expect":
                expect.append(value.strip().lower())
        if encodings:
            # Only "chunked" last is framing gunicorn accepts; anything else it refuses.
            self.chunked = encodings[-1].split(b",")[-1].strip() == b"chunked" and not lengths
            if not self.chunked:
                self.verdict = "complete"
            self.chunk_position = self.head_end
        elif lengths:
            text = lengths[0]
            if len(lengths) > 1 or not text.isdigit() or not text.isascii():
                self.verdict = "complete"  # gunicorn answers 400
                return
            self.body_length = int(text)
            if self.body_length > self.max_body:
                self.verdict = "body too large"
                return
        else:
            self.body_length = 0
        wants_body = self.chunked or bool(self.body_length)
        self.continue_expected = (wants_body and expect == [b"100-continue"]
                                  and lines[0].endswith(b"HTTP/1.1"))

    def _body_verdict(self) -> str:
        if self.verdict != "incomplete":
            return self.verdict
        if not self.chunked:
            complete = len(self.data) - self.head_end >= (self.body_length or 0)
            return "complete" if complete else "incomplete"
        if len(self.data) - self.head_end > 8 * self.max_body + 1024:
            return "body too large"  # the framing of very many tiny chunks
        # Every search below starts where the previous one stopped or is bounded, so bytes
        # trickling in one at a time never make a read rescan what came before.
        while self.trailers_scanned < 0:
            line_end = self.data.find(b"\r\n", self.chunk_position,
                                      self.chunk_position + MAX_CHUNK_LINE)
            if line_end < 0:
                too_long = len(self.data) - self.chunk_position >= MAX_CHUNK_LINE
                return "bad request" if too_long else "incomplete"
            size_text = bytes(self.data[self.chunk_position:line_end]).split(b";")[0].strip()
            if not CHUNK_SIZE.fullmatch(size_text):
                return "bad request"
            size = int(size_text, 16)
            if size == 0:
                self.trailers_scanned = line_end
                break
            if self.chunked_length + size > self.max_body:
                return "body too large"
            next_line = line_end + 2 + size + 2
            if next_line > len(self.data):
                return "incomplete"
            self.chunked_length += size
            self.chunk_position = next_line
        # Trailer fields, if any, then the blank line that ends the message.
        end = self.data.find(b"\r\n\r\n", self.trailers_scanned)
        if end >= 0:
            return "complete"
        self.trailers_scanned = max(self.trailers_scanned, len(self.data) - 3)
        if len(self.data) - self.chunk_position > self.max_head:
            return "head too large"  # trailer fields are header fields
        return "incomplete"

    def request_bytes(self) -> bytes:
        """The request as gunicorn should parse it (an answered 100-continue is not repeated)."""
        if not self.continue_expected:
            return bytes(self.data)
        head = bytes(self.data[:self.head_end - 4]).split(b"\r\n")
        kept = [line for line in head
                if line.partition(b":")[0].strip().lower() != b"expect"]
        return b"\r\n".join(kept) + b"\r\n\r\n" + bytes(self.data[self.head_end:])


class HealthConn(TConn):
    """A connection of the health listener; tells the worker once when it is closed."""

    def __init__(self, *args: Any, closed: Any) -> None:
        super().__init__(*args)
        self._closed = closed

    def close(self, graceful: bool = False) -> None:
        super().close(graceful)
        closed, self._closed = self._closed, None
        if closed is not None:
            closed()


def health_request(head: bytes) -> bool:
    """True for a GET or HEAD of a health route (query and trailing slash allowed)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return False
    path = parts[1].split(b"?", 1)[0]
    return path.rstrip(b"/") in HEALTH_PATHS


def stream_request(head: bytes) -> bool:
    """True for a GET of the change stream (query and trailing slash allowed)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    return parts[1].split(b"?", 1)[0].rstrip(b"/") in STREAM_PATHS


@dataclass
class Reading:
    """A connection whose request is still arriving."""

    buffer: RequestBuffer
    deadline: float
    continue_sent: bool = False


class BufferedThreadWorker(JsonErrorWorker):
    """gthread with requests read by the event loop (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Touched by the event loop thread only.
        self._reading: dict[TConn, Reading] = {}
        self._buffered = 0  # bytes held by all of self._reading
        self._health_open = 0  # connections of the health listener, counted in nr_conns too
        self._streams: ThreadPoolExecutor | None = None  # GET /flows/events threads
        self._stepped_back: list[Any] = []  # API listeners left to the other workers for now
        self._step_back_until = 0.0
        self._may_take_until = 0.0  # back from a step back: one connection may be taken

    def _runtime(self) -> Any:
        return getattr(getattr(self, "wsgi", None), "extensions", {}).get("flow_repository")

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: the graceful shutdown begins, and every open stream is told to end."""
        super().handle_exit(sig, frame)
        runtime = self._runtime()
        if runtime is not None and runtime.watch is not None:
            self.method_queue.defer(runtime.watch.shutdown)

    def run(self) -> None:
        runtime = self._runtime()  # the app is loaded by now
        if runtime is not None and runtime.watch is not None:
            self._streams = ThreadPoolExecutor(
                max_workers=runtime.settings.max_watchers + STREAM_SPARE_THREADS,
                thread_name_prefix="stream")
        try:
            super().run()
        finally:
            if self._streams is not None:
                self._streams.shutdown(wait=False)

    def _health_port(self) -> int:
        runtime = getattr(self.wsgi, "extensions", {}).get("flow_repository")
        return runtime.settings.health_port if runtime is not None else 0

    def _is_health(self, listener: Any) -> bool:
        port = self._health_port()
        try:
            return bool(port) and listener.getsockname()[1] == port
        except (OSError, IndexError, TypeError):
            return False

    def set_accept_enabled(self, enabled: bool) -> None:
        """Listeners stay registered while the worker runs: past the bound, accept() answers
        503 at once rather than leaving connections (and the health port) unanswered."""
        self._step_forward()
        super().set_accept_enabled(enabled or self.alive)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._stepped_back:
            left = self._step_back_until - time.monotonic()
            if left <= 0:
                self._step_forward()
            else:
                timeout = min(timeout, left)
        super().wait_for_and_dispatch_events(timeout)

    def _step_back(self, listener: Any) -> bool:
        """Leave a waiting connection to another worker for a moment, if this worker is
        busy: True when it stepped back (the listener is unregistered until then).

        Workers share the listening socket and the kernel hands a new connection to
        whichever accepts first, so keep-alive clients can pile up on one worker (13 of 16
        while the other held 3) and wait for its threads while the other idles. A worker
        already holding a connection per thread steps back for STEP_BACK_SECONDS before
        each connection it takes: if it is still waiting then, no other worker wanted it.
        Alone, or below its threads, a worker never waits."""
        if self.cfg.workers < 2 or self.nr_conns - self._health_open < self.cfg.threads:
            return False
        now = time.monotonic()
        if now < self._may_take_until:
            self._may_take_until = 0.0  # one connection per step back
            return False
        self.poller.unregister(listener)
        self._stepped_back.append(listener)
        self._step_back_until = now + STEP_BACK_SECONDS
        return True

    def _step_forward(self) -> None:
        if self._stepped_back:
            for listener in self._stepped_back:
                self.poller.register(listener, selectors.EVENT_READ, self.accept)
            self._stepped_back = []
            self._may_take_until = time.monotonic() + STEP_BACK_SECONDS

    def accept(self, listener: Any) -> None:
        health = self._is_health(listener)
        if not health and self._step_back(listener):
            return
        if health:
            full = self._health_open >= HEALTH_CONNECTIONS
        else:
            full = self.nr_conns - self._health_open >= self.worker_connections
        try:
            client_sock, client_addr = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        if full:
            self._refuse(client_sock)
            return
        self.nr_conns += 1
        client_sock.setblocking(True)
        if health:
            self._health_open += 1
            conn: TConn = HealthConn(self.cfg, client_sock, client_addr,
                                     listener.getsockname(), closed=self._health_closed)
        else:
            conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self.enqueue_req(conn)

    def _health_closed(self) -> None:
        self._health_open -= 1

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        """Every slot is taken: a quick 503, then close (no thread, no buffer, no wait)."""
        try:
            sock.setblocking(False)
            sock.send(error_bytes(503, "Service Unavailable",
                                  "Every connection slot is busy; retry.", "Retry-After: 1\r\n"))
            # What the client already sent is read, so that closing does not reset the
            # connection before the client has read the answer.
            sock.recv(RECV_SIZE)
        except OSError:
            pass
        finally:
            sock.close()

    def _limits(self) -> tuple[float, int]:
        runtime = getattr(self.wsgi, "extensions", {}).get("flow_repository")
        if runtime is None:  # another app served with this worker (a benchmark's bare route)
            return DEFAULT_REQUEST_TIMEOUT, DEFAULT_MAX_BODY
        return runtime.settings.gunicorn_request_timeout, runtime.settings.max_body_bytes

    def _max_head(self) -> int:
        cfg = self.cfg
        return min(MAX_HEAD_BYTES, cfg.limit_request_line + cfg.limit_request_fields * (
            cfg.limit_request_field_size + 2) + 4)

    def enqueue_req(self, conn: TConn) -> None:
        """Every path to the thread pool comes here: read the request first, then hand it on."""
        # TLS is terminated in front of the service (the ingress); should gunicorn itself be
        # given certificates, its stock reading applies. Only HTTP/1.x is configured.
        if self.cfg.is_ssl or getattr(conn, "request_read", False):
            conn.request_read = False
            super().enqueue_req(conn)
            return
        timeout, max_body = self._limits()
        reading = Reading(RequestBuffer(self._max_head(), max_body),
                          time.monotonic() + timeout)
        # Bytes a keep-alive client already sent behind its previous request.
        leftover = conn.parser.unreader.take_buffered() if conn.parser else b""
        conn.sock.setblocking(False)
        self._reading[conn] = reading
        if leftover and self._advance(conn, reading, leftover):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))

    def _readable(self, conn: TConn, _sock: Any) -> None:
        reading = self._reading.get(conn)
        if reading is None:
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn, registered=True)
            return
        if self._buffered + len(data) > BUFFER_BUDGET_BODIES * reading.buffer.max_body:
            self._answer(conn, True, error_bytes(
                503, "Service Unavailable", "Too many requests are being received; retry.",
                "Retry-After: 5\r\n"))
            return
        self._advance(conn, reading, data, registered=True)

    def _advance(self, conn: TConn, reading: Reading, data: bytes,
                 registered: bool = False) -> bool:
        """Feed bytes; True when the connection left the reading state (served or closed)."""
        verdict = reading.buffer.feed(data)
        self._buffered += len(data)
        if verdict == "complete":
            self._hand_over(conn, reading, registered)
            return True
        if verdict == "bad request":
            self._answer(conn, registered, error_bytes(
                400, "Bad Request", f"Bad Request: {REFUSED} (malformed chunked body)."))
            return True
        if verdict == "head too large":
            self._answer(conn, registered, error_bytes(
                431, "Request Header Fields Too Large",
                f"Request Header Fields Too Large: {REFUSED}."))
            return True
        if verdict == "body too large":
            self._answer(conn, registered, error_bytes(
                413, "Content Too Large",
                f"Request body too large: the limit is {reading.buffer.max_body} bytes."))
            return True
        if reading.buffer.continue_expected and not reading.continue_sent:
            reading.continue_sent = True
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        return False

    def _hand_over(self, conn: TConn, reading: Reading, registered: bool) -> None:
        if isinstance(conn, HealthConn) and not health_request(bytes(reading.buffer.data[:512])):
            self._answer(conn, registered, error_bytes(
                404, "Not Found", "The health port serves /livez, /readyz and /healthcheck "
                                  "only."))
            return
        if registered:
            self.poller.unregister(conn.sock)
        del self._reading[conn]
        self._buffered -= len(reading.buffer.data)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(reading.buffer.request_bytes())
        conn.data_ready = True
        conn.request_read = True
        if self._streams is not None and stream_request(bytes(reading.buffer.data[:512])):
            future = self._streams.submit(self.handle, conn)
            future.add_done_callback(
                lambda done: self.method_queue.defer(self.finish_request, conn, done))
            return
        super().enqueue_req(conn)

    def _answer(self, conn: TConn, registered: bool, answer: bytes) -> None:
        self._send(conn, answer)
        self._close(conn, registered)

    @staticmethod
    def _send(conn: TConn, data: bytes) -> None:
        # Small answers fit the socket's send buffer; a client that does not read gets less.
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _close(self, conn: TConn, registered: bool) -> None:
        if registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        reading = self._reading.pop(conn, None)
        if reading is not None:
            self._buffered -= len(reading.buffer.data)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections whose request did not arrive in time (or any, on shutdown)."""
        super().murder_pending()
        now = time.monotonic()
        for conn, reading in list(self._reading.items()):
            idle = not reading.buffer.data
            if idle and (not self.alive or reading.deadline <= now):
                self._close(conn, registered=True)  # nothing was asked: nothing to answer
            elif reading.deadline <= now:
                self._answer(conn, True, error_bytes(
                    408, "Request Timeout", "The request was not received in time."))
