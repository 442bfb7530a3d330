"""The ``orbital`` command as a user runs it: real processes, real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orbital.keys import Keys
from orbital.settings import Settings
from tests.conftest import free_port

COMMANDS = [
    "demo",
    "worker",
    "enqueue",
    "nightly",
    "status",
    "history",
    "logs",
    "cancel",
    "fleet",
    "show",
]


def orbital(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orbital", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")}
    env.update(
        ORBITAL_REDIS_URL=settings.redis_url,
        ORBITAL_PREFIX=settings.prefix,
        ORBITAL_HOME=str(settings.home),
    )
    return env


@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A machine with no configuration at all: only HOME and PATH."""
    env = {"HOME": str(tmp_path / "home"), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    yield env
    pidfile = tmp_path / "home" / ".orbital" / "redis" / "redis.pid"
    if pidfile.exists():
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, cli_env: dict[str, str]) -> None:
    """``orbital <command> --help`` explains the command."""
    result = orbital(command, "--help", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m orbital " + command in result.stdout


def test_demo_on_a_fresh_machine(fresh_home: dict[str, str], sample_fleet: Path) -> None:
    """``orbital demo`` with no configuration: embedded Redis, sample fleet, one
    nightly, results table and triage queue with the expected failures."""
    result = orbital("demo", "--sandbox", "local", env=fresh_home, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "nightly" in out
    assert "3 passed, 4 failed of 7" in out
    assert "triage queue (worst first):" in out
    assert "frontend-http" in out
    assert "bats:basics.bats:required variable DT_ENDPOINT" in out
    assert "[7/7]" in out  # progress while it runs

    again = orbital("demo", "--sandbox", "local", "--json", env=fresh_home, timeout=300)
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    statuses = sorted((b["repo"].split("/")[1], b["arch"], b["status"]) for b in data["builds"])
    assert statuses == [
        ("lab-business-events", "amd64", "failed"),
        ("lab-business-events", "arm64", "failed"),
        ("lab-kubernetes-101", "amd64", "passed"),
        ("lab-kubernetes-101", "arm64", "passed"),
        ("lab-log-ingest", "amd64", "failed"),
        ("lab-log-ingest", "arm64", "failed"),
        ("lab-otel-basics", "amd64", "passed"),
    ]
    assert data["nightly"]["finished"]
    assert data["nightly"]["total"] == 7
    assert len(data["triage"]) == 4


def test_fleet_shows_registry_and_fanout(cli_env: dict[str, str], shared_dir: Path) -> None:
    """``orbital fleet`` on the real registry: 30 entries, 25 eligible, 47 jobs."""
    registry = str(shared_dir / "fleet" / "repos.yaml")
    human = orbital("fleet", "--file", registry, env=cli_env)
    assert human.returncode == 0, human.stderr
    assert "30 entries, 25 eligible, 47 nightly jobs (22 on both archs)" in human.stdout
    data = json.loads(orbital("fleet", "--file", registry, "--json", env=cli_env).stdout)
    assert len(data["nightly"]) == 47
    assert len(data["entries"]) == 30


def test_bad_branch_is_refused_with_a_clear_error(
    cli_env: dict[str, str], client: redis.Redis, settings: Settings
) -> None:
    """A branch with shell characters is refused by name; nothing is queued."""
    result = orbital(
        "enqueue", "acme/lab", "--branch", "main;touch /tmp/pwned", "--arch", "amd64", env=cli_env
    )
    assert result.returncode == 2
    assert "invalid branch 'main;touch /tmp/pwned'" in result.stderr
    assert not client.keys(f"{settings.prefix}:*")


def test_enqueue_status_cancel_history_round_trip(cli_env: dict[str, str]) -> None:
    """Queue a job, see it waiting, cancel it, find it in history, all with --json."""
    queued = json.loads(
        orbital(
            "enqueue", "acme/lab", "--arch", "amd64", "--id", "cli-1", "--json", env=cli_env
        ).stdout
    )
    assert queued == [{"job_id": "cli-1", "outcome": "queued", "holder": "", "state": ""}]
    status = json.loads(orbital("status", "--json", env=cli_env).stdout)
    assert status["queues"] == {"test:amd64": 1}
    cancelled = json.loads(orbital("cancel", "cli-1", "--json", env=cli_env).stdout)
    assert cancelled[0]["outcome"] == "cancelled"
    history = json.loads(orbital("history", "--json", env=cli_env).stdout)
    assert [(b["job_id"], b["status"]) for b in history] == [("cli-1", "cancelled")]
    unknown = orbital("logs", "nope", env=cli_env)
    assert unknown.returncode == 1
    assert "no such job" in unknown.stderr


def test_worker_drains_and_exits_on_sigterm(
    cli_env: dict[str, str], client: redis.Redis, settings: Settings
) -> None:
    """SIGTERM makes a worker stop claiming, withdraw its registration and exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbital", "worker", "--name", "w-term", "--arch", "amd64"],
        env=cli_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    keys = Keys(settings.prefix)
    deadline = time.monotonic() + 20
    while not client.exists(keys.worker("w-term")):
        assert time.monotonic() < deadline, "worker never registered"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "worker w-term: draining" in err
    assert "worker w-term: stopped" in err
    assert not client.exists(keys.worker("w-term"))


def test_unreachable_redis_is_one_clear_line(cli_env: dict[str, str]) -> None:
    """No traceback when Redis is down: one line naming the problem, exit 3."""
    env = {**cli_env, "ORBITAL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = orbital("status", env=env)
    assert result.returncode == 3
    assert result.stderr.startswith("orbital: cannot reach Redis")
    assert "Traceback" not in result.stderr


def test_worker_stops_on_sigterm_while_redis_is_unreachable(cli_env: dict[str, str]) -> None:
    """A worker still waiting for Redis at start obeys SIGTERM at once."""
    env = {**cli_env, "ORBITAL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbital", "worker", "--name", "w-noredis", "--arch", "amd64"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Redis unreachable at start" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped before Redis answered" in err


def test_worker_with_an_unreachable_docker_engine_exits_2(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A docker worker whose engine does not answer stops with one clear line, exit 2."""
    env = {
        **cli_env,
        "ORBITAL_DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "ORBITAL_DOCKER_ISOLATION": "nested-docker",
    }
    result = subprocess.run(
        [sys.executable, "-m", "orbital", "worker", "--sandbox", "docker", "--name", "w-nodocker"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "its sandbox cannot be used" in result.stderr
    assert "Docker engine not reachable" in result.stderr
    assert "Traceback" not in result.stderr
