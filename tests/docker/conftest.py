"""Fixtures for the Docker sandbox tests: a real engine, the test images, providers.

The engine is the one ``.ci/docker/start-dockerd.sh`` starts (its own data-root,
socket and bridge); its address comes from ``ORBITAL_TEST_DOCKER_HOST``. Without
it these tests skip, except in CI (``CI=true``), where they fail. The images are
``orbital-test/lab:latest`` and ``orbital-test/outer:latest`` from
``.ci/docker/build-images.sh``. Slots run in ``nested-docker`` mode (Sysbox is not
installed on CI machines).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
import pytest

from orbital.jobs import Job, JobType
from orbital.sandboxes.base import Sandbox, StepResult
from orbital.sandboxes.docker import DockerSandboxProvider
from orbital.sandboxes.docker_engine import remove_leftovers
from orbital.settings import Settings
from tests.conftest import IN_CI

LAB_IMAGE = "orbital-test/lab:latest"
OUTER_IMAGE = "orbital-test/outer:latest"
HOST_ENV = "ORBITAL_TEST_DOCKER_HOST"
_HINT = "run .ci/docker/start-dockerd.sh and .ci/docker/build-images.sh, then export "
_ports = itertools.count(0)
_STALE_S = 3 * 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/docker needs the engine: mark it ``docker``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI requires the test Docker engine: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """The test engine's address; skips (fails in CI) when it is unset or unreachable."""
    url = os.environ.get(HOST_ENV, "")
    if not url:
        _unavailable(
            f"{HOST_ENV} is not set ({_HINT}{HOST_ENV}=unix:///run/orbital-test-docker.sock)"
        )
    try:
        client = docker.APIClient(base_url=url, timeout=30)
        for image in (LAB_IMAGE, OUTER_IMAGE):
            client.inspect_image(image)
    except docker.errors.ImageNotFound as err:
        _unavailable(f"test image missing in {url}: {err.explanation} ({_HINT}{HOST_ENV})")
    except docker.errors.DockerException as err:
        _unavailable(f"{HOST_ENV}={url} is not reachable: {err}")
    _remove_stale(client)
    yield url
    client.close()


def _remove_stale(client: docker.APIClient) -> None:
    """Remove Orbital containers and volumes that an interrupted test run left on the
    test engine. Only ones older than any test run, so concurrent sessions are safe."""
    cutoff = time.time() - _STALE_S
    filters = {"label": ["org.orbital.managed"]}
    for box in client.containers(all=True, filters=filters):
        if box["Created"] < cutoff:
            client.remove_container(box["Id"], force=True, v=True)
    for volume in client.volumes(filters=filters).get("Volumes") or []:
        created = volume.get("CreatedAt", "")
        try:
            stamp = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        if stamp < cutoff:
            try:
                client.remove_volume(volume["Name"], force=True)
            except docker.errors.APIError:
                continue  # still used by a container of a running session


@pytest.fixture
def host_api(docker_host: str) -> Iterator[docker.APIClient]:
    """A low-level client of the test engine."""
    client = docker.APIClient(base_url=docker_host, timeout=60)
    yield client
    client.close()


def _free_port_block(size: int = 4) -> int:
    """A base port whose next ``size`` loopback ports are free right now."""
    for _ in range(200):
        base = 32000 + (next(_ports) * size) % 20000
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of loopback ports between 32000 and 52000")


def make_settings(docker_host: str, home: Path, **overrides: Any) -> Settings:
    """Settings for a provider on the test engine: a private prefix, slot directory and
    ports, nested-docker mode, the test images, short backoffs."""
    token = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "prefix": f"t{token}",
        "home": home,
        "docker_host": docker_host,
        "docker_isolation": "nested-docker",
        "docker_outer_image": OUTER_IMAGE,
        "docker_lab_image": LAB_IMAGE,
        "docker_memory": "1g",
        "docker_cpus": 1.0,
        "docker_pids_limit": 2048,
        "docker_port_base": _free_port_block(),
        "docker_slot_dir": f"/run/orbital-test-slots/{token}",
        "docker_rebuild_backoff_s": 0.5,
        "docker_rebuild_backoff_max_s": 5.0,
        "docker_health_interval_s": 1.0,
        "docker_kill_attempts": 2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so one provider (and its warm slots) can serve a whole module."""
    return "asyncio"


@pytest.fixture
def docker_settings(docker_host: str, tmp_path: Path) -> Callable[..., Settings]:
    """A factory of :func:`make_settings` for this test."""
    return lambda **overrides: make_settings(docker_host, tmp_path / "home", **overrides)


async def close_provider(provider: DockerSandboxProvider, host: docker.APIClient) -> None:
    """Close ``provider`` and remove anything labelled with its prefix."""
    with anyio.CancelScope(shield=True):
        await provider.close()
        await anyio.to_thread.run_sync(
            lambda: remove_leftovers(host, provider.settings.prefix, None)
        )
    shutil.rmtree(provider.config.slot_dir, ignore_errors=True)


ProviderFactory = Callable[..., Awaitable[DockerSandboxProvider]]


@pytest.fixture
async def open_provider(
    docker_settings: Callable[..., Settings], host_api: docker.APIClient
) -> AsyncIterator[ProviderFactory]:
    """A factory that opens providers; each is closed and its containers are gone
    after the test."""
    opened: list[DockerSandboxProvider] = []

    async def make(capacity: int = 1, worker: str = "", **overrides: Any) -> DockerSandboxProvider:
        settings = docker_settings(**overrides)
        provider = DockerSandboxProvider(settings, worker or f"w-{uuid.uuid4().hex[:6]}")
        opened.append(provider)
        await provider.open(capacity)
        return provider

    yield make
    for provider in opened:
        await close_provider(provider, host_api)


def lab_job(repo: str = "acme/lab-one", **fields: Any) -> Job:
    """A lab job for ``repo``."""
    return Job(type=JobType.INTEGRATION_TEST, repo=repo, arch="amd64", **fields)


async def sh(
    sandbox: Sandbox,
    script: str,
    *,
    timeout_s: float = 60,
    cwd: str = "/workspaces",
    env: dict[str, str] | None = None,
) -> tuple[StepResult, str]:
    """Run a bash script in the sandbox; return its result and combined output."""
    output = bytearray()

    async def keep(chunk: bytes) -> None:
        output.extend(chunk)

    result = await sandbox.run(
        ["bash", "-c", script], env=env or {}, cwd=cwd, timeout_s=timeout_s, on_output=keep
    )
    return result, output.decode(errors="replace")


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while not await predicate():
            await anyio.sleep(0.2)
        return
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
