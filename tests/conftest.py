"""Fixtures shared by the whole suite: a real Redis server, settings, ../shared.

One ``redis-server`` (Debian's, or ``ORBITAL_TEST_REDIS_SERVER``) is started per
test session on a free loopback port; each test gets its own key prefix, so
tests never see each other's keys. In CI (``CI=true``) a missing component is
an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orbital.settings import Settings

IN_CI = os.environ.get("CI") == "true"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def require(condition: bool, reason: str) -> None:
    """Skip the test when a component is missing; fail instead in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires this component: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process the tests own (they may stop and restart it)."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _redis_executable() -> str | None:
    return os.environ.get("ORBITAL_TEST_REDIS_SERVER") or shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's Redis server."""
    executable = _redis_executable()
    if executable is None:
        if IN_CI:
            pytest.fail("CI requires redis-server (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_server: RedisServer, prefix: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test Redis with a private prefix and home, short leases."""
    return Settings(
        redis_url=redis_server.url,
        prefix=prefix,
        home=tmp_path / "home",
        lease_s=3.0,
        heartbeat_ttl_s=3.0,
        max_attempts=3,
        nightly_stagger_s=0.0,
        secrets=("s3cr3t-value",),
        secret_env=(),
    )


@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[redis.Redis]:
    """A blocking client; the test's keys are deleted afterwards."""
    conn = redis.Redis.from_url(redis_server.url)
    yield conn
    try:
        for key in conn.scan_iter(match=f"{prefix}:*", count=1000):
            conn.delete(key)
    except redis.ConnectionError:
        pass
    conn.close()


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the clone (fleet registry, webhook payloads)."""
    require(
        SHARED.is_dir(),
        f"{SHARED} is absent: the real fleet registry and webhook payloads live there",
    )
    return SHARED


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio: redis-py's asyncio client is what the worker uses."""
    return "asyncio"


@pytest.fixture(scope="session")
def sample_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's sample labs as real bare git repositories; returns their repos.yaml."""
    from orbital.demo import create_sample_fleet

    require(shutil.which("git") is not None, "git is not installed")
    require(shutil.which("bats") is not None, "bats is not installed (apt-get install bats)")
    return create_sample_fleet(tmp_path_factory.mktemp("fleet") / "demo")


@pytest.fixture
def lab_settings(settings: Settings, sample_fleet: Path) -> Settings:
    """Settings whose git URL template points at the sample labs."""
    import dataclasses

    return dataclasses.replace(
        settings,
        fleet_file=str(sample_fleet),
        git_url_template=f"file://{sample_fleet.parent / 'repos'}/{{repo}}.git",
    )


@pytest.fixture
def labs(tmp_path: Path) -> object:
    """A factory of lab repositories in real bare git repos."""
    from tests.labs import LabFactory

    require(shutil.which("git") is not None, "git is not installed")
    return LabFactory(tmp_path / "labs")
