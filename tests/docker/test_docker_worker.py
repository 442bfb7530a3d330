"""Whole lab runs in the Docker sandbox: a worker job in the nested layout, the demo
fleet compared with the local sandbox, and ``orbital worker --sandbox docker``."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
import redis

from orbital.builds import BuildHistory, BuildRecord
from orbital.connection import async_client
from orbital.demo import run_demo
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.sandboxes.docker import DockerSandboxProvider, engine_ready
from orbital.sandboxes.select import choose_provider
from orbital.settings import Settings
from orbital.workers import Worker, WorkerConfig
from tests.docker.conftest import close_provider, make_settings
from tests.labs import LabFactory

# The check an in-lab script makes that it runs where Orbital says: the repository's
# directory in the lab container, the slot's port variables, and its own daemon (which
# holds only this lab's container).
NESTED_CHECKS = """set -eu
test "$PWD" = /workspaces/lab-nested
test "$K3D_LB_HTTP_PORT" = "$ORBITAL_SLOT_PORT"
test -S /var/run/docker.sock
curl -sf --unix-socket /var/run/docker.sock http://d/containers/json | jq -e 'length == 1'
printf '{"step":"nested","description":"runs in the lab container","status":"pass",'\\
'"started_at":1,"finished_at":2,"duration_s":1,"error":""}\\n' >> "$RESULT_JSON"
"""


def docker_worker_settings(
    settings: Settings, docker_host: str, home: Path, **more: Any
) -> Settings:
    """The suite's Redis settings plus a private Docker slot configuration."""
    return make_settings(
        docker_host,
        home,
        redis_url=settings.redis_url,
        prefix=settings.prefix,
        lease_s=settings.lease_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        secrets=settings.secrets,
        secret_env=(),
        **more,
    )


async def run_worker(
    settings: Settings, provider: DockerSandboxProvider, until: Callable[[], bool]
) -> None:
    """Run an in-process worker with ``provider`` until ``until()`` holds, then drain."""
    worker = Worker(
        settings,
        WorkerConfig(arch="amd64", capacity={"test:amd64": 1}, name="w-docker", drain_timeout_s=5),
        provider,
        client=async_client(settings.redis_url),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker.run(handle_signals=False))
        with anyio.fail_after(240):
            while not until():
                await anyio.sleep(0.1)
        worker.drain()


def build_of(client: redis.Redis, settings: Settings, job: Job) -> BuildRecord:
    record = BuildHistory(client, Keys(settings.prefix)).get(job.id)
    assert record is not None, f"no build record for {job.id}"
    return record


@pytest.mark.anyio
async def test_whole_lab_run_in_the_nested_layout(
    settings: Settings,
    docker_host: str,
    labs: LabFactory,
    client: redis.Redis,
    tmp_path: Path,
    host_api: docker.APIClient,
) -> None:
    """A worker with the Docker sandbox clones a lab (from a host directory mounted into
    the lab), runs BATS and stage 2 inside the lab container, and records the build with
    its isolation mode; a failing lab fails at the right step."""
    labs.make(
        "acme/lab-nested",
        {
            ".devcontainer/post-create.sh": "echo created > /workspaces/.created\n",
            ".devcontainer/test/unit/unit.bats": '@test "runs in bats" {\n  [ -f /workspaces/.created ] || true\n}\n',
            ".devcontainer/test/integration.sh": NESTED_CHECKS,
        },
    )
    labs.script_lab("acme/lab-broken", "echo 'expected 200, got 503'; exit 1\n")
    docker_settings = docker_worker_settings(
        settings, docker_host, tmp_path / "home", git_url_template=labs.template
    )
    queue = Queue(client, docker_settings)
    good = Job(type=JobType.INTEGRATION_TEST, repo="acme/lab-nested", arch="amd64")
    bad = Job(type=JobType.INTEGRATION_TEST, repo="acme/lab-broken", arch="amd64")
    queue.enqueue(good)
    queue.enqueue(bad)

    provider = DockerSandboxProvider(docker_settings, "w-docker")
    try:
        await run_worker(
            docker_settings,
            provider,
            lambda: all(queue.get_job(j.id).is_terminal for j in (good, bad)),
        )
    finally:
        await close_provider(provider, host_api)

    record = build_of(client, docker_settings, good)
    assert record.status == "passed", (record.failed_step, record.failure_summary)
    assert [s.name for s in record.steps] == [
        "clone",
        "bats:unit.bats:runs in bats",
        "post-create",
        "post-start",
        "nested",
        "integration",
    ]
    assert record.sandbox["kind"] == "docker"
    assert record.sandbox["isolation"] == "nested-docker"
    assert len(record.commit_sha) == 40

    failed = build_of(client, docker_settings, bad)
    assert failed.status == "failed"
    assert failed.failed_step == "integration"
    assert "expected 200, got 503" in failed.failure_summary


@pytest.mark.anyio
async def test_daemon_job_stays_up_for_a_shell_until_cancelled(
    settings: Settings,
    docker_host: str,
    labs: LabFactory,
    client: redis.Redis,
    tmp_path: Path,
    host_api: docker.APIClient,
) -> None:
    """A daemon job runs its set-up, then keeps its slot (an operator can open a shell
    in the lab) until it is cancelled; then it ends cancelled and its slot is rebuilt."""
    labs.script_lab("acme/lab-daemon", "exit 0\n", post_start="echo up > /workspaces/.daemon-up\n")
    docker_settings = docker_worker_settings(
        settings, docker_host, tmp_path / "home", git_url_template=labs.template
    )
    queue = Queue(client, docker_settings)
    job = Job(type=JobType.DAEMON, repo="acme/lab-daemon", arch="amd64")
    queue.enqueue(job)
    provider = DockerSandboxProvider(docker_settings, "w-docker-daemon")
    shell_output: list[str] = []
    old_container = ""

    def held() -> bool:
        nonlocal old_container
        if not shell_output:
            sandbox = provider.running(job.id)
            if sandbox is None or not sandbox.lab:
                return False
            # The operator's shell, without a terminal: -i instead of -it.
            argv = [a if a != "-it" else "-i" for a in sandbox.shell_argv()]
            done = subprocess.run(
                argv, input=b"cat /workspaces/.daemon-up; exit\n", capture_output=True, timeout=30
            )
            if done.stdout.strip() != b"up":
                return False  # post-start has not run yet
            shell_output.append(done.stdout.decode())
            old_container = sandbox.slot.container
            queue.cancel(job.id)
        if not queue.get_job(job.id).is_terminal:
            return False
        # The worker closes its provider when it stops: see the rebuild while it runs.
        slot = provider.describe()["slots"][0]
        return bool(slot["state"] == "ready" and slot["container"] != old_container)

    try:
        await run_worker(docker_settings, provider, held)
        assert queue.get_job(job.id).state == "cancelled"
        assert shell_output == ["up\n"]
    finally:
        await close_provider(provider, host_api)


def _outcomes(client: redis.Redis, settings: Settings, run_id: str) -> dict[tuple[str, str], Any]:
    records = BuildHistory(client, Keys(settings.prefix)).recent(200)
    return {
        (r.repo, r.arch): (r.status, r.failed_step, [(s.name, s.status) for s in r.steps])
        for r in records
        if r.nightly_id == run_id
    }


def test_demo_fleet_passes_and_fails_as_on_the_local_sandbox(
    settings: Settings, docker_host: str, tmp_path: Path, sample_fleet: Path
) -> None:
    """The demo's nightly run gives the same statuses, failed steps and step lists in
    the Docker sandbox as in the local sandbox."""
    quiet: Callable[[str], None] = lambda _line: None  # noqa: E731
    local = run_demo(dataclasses.replace(settings, home=tmp_path / "local"), progress=quiet)
    assert local.sandbox == "local"
    expected = _outcomes(local.client, local.settings, local.run.run_id)

    docker_settings = docker_worker_settings(settings, docker_host, tmp_path / "docker")
    result = run_demo(docker_settings, provider_factory=DockerSandboxProvider, progress=quiet)
    assert result.sandbox == "docker"
    got = _outcomes(result.client, result.settings, result.run.run_id)

    assert got == expected
    statuses = {status for status, _, _ in expected.values()}
    assert statuses == {"passed", "failed"}


def test_engine_ready_names_what_is_missing(docker_host: str, tmp_path: Path) -> None:
    """engine_ready (the auto choice) says yes for a ready engine and names the missing
    image or the unreachable engine otherwise."""
    ok, why = engine_ready(make_settings(docker_host, tmp_path))
    assert ok, why
    ok, why = engine_ready(
        make_settings(docker_host, tmp_path, docker_lab_image="orbital-test/nope:1")
    )
    assert not ok
    assert "orbital-test/nope:1" in why
    ok, why = engine_ready(make_settings("unix:///run/no-such-docker.sock", tmp_path), timeout_s=2)
    assert not ok
    assert "no-such-docker.sock" in why


def test_auto_sandbox_picks_docker_only_when_the_engine_is_ready(
    docker_host: str, tmp_path: Path
) -> None:
    """``--sandbox auto`` (the demo's choice) takes Docker when the engine answers with
    the images, else the local sandbox, and says why either way."""
    factory, why = choose_provider(make_settings(docker_host, tmp_path), "auto")
    assert factory is DockerSandboxProvider
    assert why == f"docker (nested-docker) at {docker_host}"
    missing = make_settings(docker_host, tmp_path, docker_outer_image="orbital-test/none:1")
    factory, why = choose_provider(missing, "auto")
    assert factory is not DockerSandboxProvider
    assert why.startswith("local")
    assert "orbital-test/none:1" in why


def test_orbital_worker_with_the_docker_sandbox(
    settings: Settings, docker_host: str, labs: LabFactory, client: redis.Redis, tmp_path: Path
) -> None:
    """``orbital worker --sandbox docker`` runs a lab job in a warm Docker slot, registers
    the docker isolation mode, and drains on SIGTERM."""
    labs.script_lab("acme/lab-cli", "test -S /var/run/docker.sock\n")
    docker_settings = docker_worker_settings(
        settings, docker_host, tmp_path / "home", git_url_template=labs.template
    )
    env = {**os.environ, **_as_env(docker_settings)}
    env.pop("ORBITAL_SANDBOX", None)
    queue = Queue(client, docker_settings)
    job = Job(type=JobType.INTEGRATION_TEST, repo="acme/lab-cli", arch="amd64")
    queue.enqueue(job)

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orbital",
            "worker",
            "--sandbox",
            "docker",
            "--arch",
            "amd64",
            "--capacity",
            "1",
            "--name",
            "w-cli-docker",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not queue.get_job(job.id).is_terminal and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            time.sleep(0.2)
        record = build_of(client, docker_settings, job)
        assert record.status == "passed", record.failure_summary
        assert record.sandbox["kind"] == "docker"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0].decode(errors="replace")
    assert process.returncode == 0, output
    assert "nested-docker" in output


def _as_env(settings: Settings) -> dict[str, str]:
    """Settings as ORBITAL_* variables (what a service's environment file would hold)."""
    env: dict[str, str] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"ORBITAL_{field.name.upper()}"] = str(value)
    return env
