"""services/webhook.py as an operator runs it: a separate process configured by
ORBITAL_* variables, refusing bad configuration, masking its logs, stopping on
SIGTERM."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orbital.settings import Settings
from tests.conftest import free_port
from tests.test_github_harness import headers, raw_payload, write_fleet

pytestmark = pytest.mark.shared

PROGRAM = Path(__file__).resolve().parents[1] / "services" / "webhook.py"
# Shaped so that it can also be sent as an event name, which the receiver logs.
SECRET = "hook_secret_value_1234"


def service_env(settings: Settings, tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")}
    env.update(
        ORBITAL_REDIS_URL=settings.redis_url,
        ORBITAL_PREFIX=settings.prefix,
        ORBITAL_HOME=str(tmp_path / "home"),
        ORBITAL_WEBHOOK_PORT=str(port),
        ORBITAL_FLEET_FILE=str(write_fleet(tmp_path / "repos.yaml")),
        ORBITAL_SECRET_ENV="",
    )
    env.update(extra)
    return env


def run_to_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROGRAM)], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def call(port: int, method: str, path: str, body: bytes = b"", hdrs: dict[str, str] | None = None,
         ) -> int:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=hdrs or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def running(settings: Settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The service program listening on a free port (killed if a test leaves it up)."""
    port = free_port()
    env = service_env(settings, tmp_path, port, ORBITAL_WEBHOOK_SECRET=SECRET)
    process = subprocess.Popen([sys.executable, str(PROGRAM)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if call(port, "GET", "/healthz") == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"webhook service did not start: {process.communicate()[1]}")
        time.sleep(0.05)
    yield process, port
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_service_without_a_secret_exits_2_saying_what_to_set(
    settings: Settings, tmp_path: Path
) -> None:
    """No ORBITAL_WEBHOOK_SECRET: the program exits 2 and names the variable."""
    result = run_to_exit(service_env(settings, tmp_path, free_port()))

    assert result.returncode == 2
    assert "ORBITAL_WEBHOOK_SECRET" in result.stderr
    assert "refuses to start" in result.stderr


def test_service_with_an_invalid_routing_file_exits_2_naming_it(
    settings: Settings, tmp_path: Path
) -> None:
    """A routing file with a mistake stops the program before it listens."""
    routing = tmp_path / "routing.yaml"
    routing.write_text("rules:\n  - event: star\n    jobs: [{agent: x}]\n")
    env = service_env(settings, tmp_path, free_port(), ORBITAL_WEBHOOK_SECRET=SECRET,
                      ORBITAL_WEBHOOK_ROUTING_FILE=str(routing))  # fmt: skip

    result = run_to_exit(env)

    assert result.returncode == 2
    assert f"{routing}, rules[0], event: 'star'" in result.stderr


def test_service_serves_masks_its_logs_and_stops_on_sigterm(
    running: tuple[subprocess.Popen[str], int], shared_dir: Path
) -> None:
    """The program accepts a signed delivery, refuses a forged one, logs no secret
    (an event named like the secret is logged masked), turns invalid HTTP into one
    warning line, and exits 0 on SIGTERM after logging its stop."""
    process, port = running
    pr = raw_payload(shared_dir, "pull_request.opened.payload.json")

    good = headers(pr, "pull_request", secret=SECRET)
    assert call(port, "POST", "/webhook", pr, good) == 202
    assert call(port, "POST", "/webhook", pr, {**good, "X-Hub-Signature-256": "sha256=0"}) == 401
    named = headers(b"{}", SECRET, secret=SECRET)
    assert call(port, "POST", "/webhook", b"{}", named) == 202
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 400")

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)

    assert process.returncode == 0
    assert "webhook receiver listening on http://127.0.0.1:" in stderr
    assert "enqueued 3 job(s)" in stderr
    assert "refused with 401" in stderr
    assert "no routing rule matches ***" in stderr
    assert SECRET not in stderr
    assert "webhook receiver stopped" in stderr
    assert "Traceback" not in stderr
