"""No credential reaches any line a served process writes (issue 16): tokens in the query
string and the Authorization header, and the passwords in QUEUE_URL and MONGODB_URL."""

from __future__ import annotations

import socket

import pytest

from support import Served, free_port

from .conftest import FakeIam

pytestmark = pytest.mark.e2e

QUEUE_PASSWORD = "QueuePass-6d1f0b"
MONGO_PASSWORD = "MongoPass-83c2aa"
QUERY_SECRETS = {"access_token": "QueryAccess-a91c", "token": "QueryToken-55e0",
                 "id_token": "QueryIdToken-7b7b", "api_key": "QueryApiKey-0f3e",
                 "password": "QueryPassword-c4d1", "secret": "QuerySecret-2a6e"}


def test_no_secret_appears_in_any_log_line(serve, iam: FakeIam, tmp_path) -> None:
    header_token = iam.grant()
    served: Served = serve(
        QUEUE_URL=f"amqp://flowuser:{QUEUE_PASSWORD}@127.0.0.1:{free_port()}/%2F",
        MONGODB_URL=f"mongodb://flowuser:{MONGO_PASSWORD}@127.0.0.1:{free_port()}/flows",
        MONGODB_TIMEOUT_MS="200", LOG_LEVEL="DEBUG")
    query = "&".join(f"{name}={value}" for name, value in QUERY_SECRETS.items())
    headers = {"Authorization": f"Bearer {header_token}"}
    for path in (f"/flows?{query}", f"/flows/0123456789abcdef01234567?{query}",
                 f"/healthcheck?{query}", f"/livez?{query}", f"/nowhere?{query}"):
        served.get(path, headers=headers, timeout=30)
        served.get(path, headers={"Authorization": "Bearer NotKnownToIam-1234"}, timeout=30)
    # A request gunicorn itself refuses (a space in the target) still names no secret.
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(f"GET /flows?access_token={QUERY_SECRETS['access_token']} x HTTP/1.1\r\n"
                     f"Host: x\r\nAuthorization: Bearer {header_token}\r\n\r\n".encode())
        sock.recv(4096)
    assert served.get("/livez").status_code == 200  # flushes the access log
    served.terminate(30)

    written = served.stdout_path.read_text() + served.stderr_path.read_text()
    assert "/flows" in written and "durationMs" in written  # the requests were logged
    secrets = [QUEUE_PASSWORD, MONGO_PASSWORD, header_token, "NotKnownToIam-1234",
               iam.service_token, *QUERY_SECRETS.values()]
    leaked = [secret for secret in secrets if secret in written]
    assert not leaked, leaked
