"""gunicorn's threaded worker, answering the errors gunicorn raises itself in the JSON error shape."""

from __future__ import annotations

import json
import socket
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker


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
            f"{reason}: refused by the HTTP server before reaching the application."
        body = json.dumps({"errors": [{"message": message, "code": status}]}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except Exception:  # noqa: BLE001 - the client may be gone; gunicorn ignores it too
            self.log.debug("Failed to send error message.")
