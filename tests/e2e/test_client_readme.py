"""The README's "Using the client" examples run as written against the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, Served, base_env, free_port

pytestmark = pytest.mark.e2e


def literal_block(after: str) -> str:
    """The indented literal block that follows the README line containing ``after``."""
    text = (ROOT / "docs" / "client.rst").read_text()  # moved out of README.rst
    block = text[text.index(after):].split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_readme_client_examples(spawn, settings, broker, tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "home"), "DEV_TOKEN_SECRET_FILE": str(tmp_path / "secret"),
           "QUEUE_URL": settings.queue_url, "EVENT_EXCHANGE": settings.event_exchange,
           "EVENT_QUEUE": settings.event_queue, "LOG_LEVEL": "WARNING"}
    port = free_port()
    api: Served = spawn(["serve"], {**env, "PORT": str(port)}, port)
    api.wait_ready()
    workdir = tmp_path / "clone"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    client_env = {**env, "FLOW_REPOSITORY_URL": api.base_url,
                  "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                  "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    gitops = literal_block("A GitOps round trip against the embedded default")
    done = run(["bash", "-euc", gitops], workdir, client_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "+ create" in done.stdout
    assert 'replace /name "CRM to ERP, hourly"' in done.stdout
    assert done.stdout.rstrip().endswith("0 to create, 0 to update, 0 to delete, 1 unchanged.")
    log = run(["git", "-C", "flows", "log", "--oneline"], workdir, client_env).stdout
    assert len(log.splitlines()) == 2

    token = run([str(ROOT / ".venv" / "bin" / "flow-repository"), "token", "--sub", "bob",
                 "--tenant", "acme", "--permissions",
                 "flows.read,flows.write,flows.control"], workdir, env).stdout.strip()
    (workdir / "example.py").write_text(literal_block("``flow-repository-client/<version>``"))
    done = run([sys.executable, "example.py"], workdir,
               {**client_env, "FLOW_REPOSITORY_TOKEN": token})
    assert done.returncode == 0, done.stderr
    assert "someone changed it first: " in done.stdout
    assert "'status': 'starting'" in done.stdout
