"""The Docker sandbox against a real engine: nested layout, steps, limits, kill paths."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import AsyncIterator

import anyio
import docker
import pytest

from orbital.errors import ConfigError, SandboxError
from orbital.sandboxes.docker import DockerSandbox, DockerSandboxProvider
from orbital.sandboxes.docker_engine import LAB_NAME
from tests.docker.conftest import LAB_IMAGE, close_provider, lab_job, make_settings, sh

pytestmark = pytest.mark.anyio

# The tests share one two-slot provider. Those that spoil a slot (timeout, cancel) are
# spread out, so a spoiled slot is rebuilt while the other one serves the next tests.

WORKER = "w-sandbox-tests"


@pytest.fixture(scope="module")
async def provider(
    docker_host: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DockerSandboxProvider]:
    """Two warm slots shared by this module's tests; a test that spoils a slot (timeout,
    cancel) leaves it to be rebuilt in the background while the other one serves."""
    settings = make_settings(
        docker_host,
        tmp_path_factory.mktemp("home"),
        docker_memory="768m",
        docker_cpus=1.0,
        docker_pids_limit=400,
        lease_s=3.0,
    )
    shared = DockerSandboxProvider(settings, WORKER)
    await shared.open(2)
    yield shared
    host = docker.APIClient(base_url=docker_host, timeout=60)
    await close_provider(shared, host)
    host.close()


async def test_nested_layout_and_lab_container(
    provider: DockerSandboxProvider, host_api: docker.APIClient
) -> None:
    """A job runs in a lab container inside the slot's own daemon, with the repo's
    directory as working directory, the env file, the port variables and labels."""
    job = lab_job("acme/lab-one")

    async with provider.acquire(job) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        slot = sandbox.slot
        outer = host_api.inspect_container(slot.container)
        assert outer["Config"]["Labels"]["org.orbital.worker"] == "w-sandbox-tests"
        assert outer["Config"]["Labels"]["org.orbital.slot"] == str(slot.index)
        assert not outer["HostConfig"]["Privileged"]
        assert set(outer["HostConfig"]["CapAdd"]) == {"SYS_ADMIN", "NET_ADMIN"}

        inner = slot.client()
        lab = inner.inspect_container(LAB_NAME)
        assert lab["Config"]["Image"] == LAB_IMAGE
        assert lab["Config"]["Labels"]["org.orbital.job"] == job.id
        assert lab["Config"]["WorkingDir"] == "/workspaces/lab-one"
        assert lab["HostConfig"]["NetworkMode"] == "host"
        assert [c["Names"] for c in host_api.containers(filters={"name": LAB_NAME})] == []

        result, out = await sh(
            sandbox,
            "pwd; echo $K3D_LB_HTTP_PORT; cat /workspaces/.orbital/lab.env",
            cwd=sandbox.repo_dir(job),
        )
        assert result.exit_code == 0, out
        lines = out.splitlines()
        assert lines[0] == "/workspaces/lab-one"
        assert lines[1] == str(slot.port)
        assert f"K3D_LB_HTTP_PORT={slot.port}" in lines
        assert f"ORBITAL_JOB_ID={job.id}" in lines
        assert sandbox.describe()["isolation"] == "nested-docker"

    described = provider.describe()
    assert described["kind"] == "docker"
    assert described["isolation"] == "nested-docker"
    assert sorted(s["index"] for s in described["slots"]) == [0, 1]
    assert {s["port"] for s in described["slots"]} == {
        provider.settings.docker_port_base,
        provider.settings.docker_port_base + 1,
    }


async def test_timeout_kills_the_step_process_group(provider: DockerSandboxProvider) -> None:
    """A step that outlives its timeout is killed with everything it started, quickly,
    and the slot is marked for rebuild."""
    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        started = time.monotonic()
        result, out = await sh(
            sandbox, "echo begun; sleep 300 & sleep 301; echo never", timeout_s=1.0
        )
        assert result.timed_out
        assert result.exit_code is None
        assert not result.cancelled
        assert time.monotonic() - started < 5
        assert "begun" in out
        assert "never" not in out
        _check, ps = await sh(sandbox, "ps -eo args | grep -c '^sleep 30[01]' || true")
        assert ps.strip() == "0", ps
        assert sandbox.needs_rebuild == "step timed out"


async def test_slot_port_is_published_on_loopback(
    provider: DockerSandboxProvider, host_api: docker.APIClient
) -> None:
    """Slot i publishes docker_port_base + i on 127.0.0.1, and a server the lab starts
    on K3D_LB_HTTP_PORT answers there from the host."""
    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        port = sandbox.slot.port
        assert port == provider.settings.docker_port_base + sandbox.slot.index
        bindings = host_api.inspect_container(sandbox.slot.container)["HostConfig"]["PortBindings"]
        assert bindings == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}

        result, out = await sh(
            sandbox,
            "mkdir -p /workspaces/www && echo slot-page > /workspaces/www/index.html && "
            'busybox httpd -p "$K3D_LB_HTTP_PORT" -h /workspaces/www',
        )
        assert result.exit_code == 0, out

        def fetch() -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as r:
                return bytes(r.read())

        assert await anyio.to_thread.run_sync(fetch) == b"slot-page\n"


async def test_step_streams_output_live(provider: DockerSandboxProvider) -> None:
    """Output reaches the callback while the step is still running."""
    async with provider.acquire(lab_job()) as sandbox:
        seen: list[tuple[float, bytes]] = []

        async def record(chunk: bytes) -> None:
            seen.append((time.monotonic(), chunk))

        result = await sandbox.run(
            ["bash", "-c", "echo first; sleep 1.5; echo second >&2; exit 4"],
            env={"X": "1"},
            cwd="/workspaces",
            timeout_s=30,
            on_output=record,
        )
        ended = time.monotonic()
        assert result.exit_code == 4
        assert not result.ok
        assert b"".join(c for _, c in seen) == b"first\nsecond\n"
        assert ended - seen[0][0] > 1.0  # "first" arrived while the step still ran


async def test_missing_command_exits_127(provider: DockerSandboxProvider) -> None:
    """A command that does not exist ends with 127 and says so in the output."""
    async with provider.acquire(lab_job()) as sandbox:
        output = bytearray()

        async def keep(chunk: bytes) -> None:
            output.extend(chunk)

        result = await sandbox.run(
            ["no-such-tool", "--x"], env={}, cwd="/workspaces", timeout_s=10, on_output=keep
        )
        assert result.exit_code == 127
        assert b"no-such-tool: command not found" in output
        assert b"Done" not in output
        assert b"[1]" not in output


async def test_cancel_kills_everything_in_the_lab(provider: DockerSandboxProvider) -> None:
    """kill() ends the running step as cancelled, kills processes started by earlier
    steps too, and later steps do not run."""
    async with provider.acquire(lab_job()) as sandbox:
        await sh(sandbox, "nohup setsid sleep 400 >/dev/null 2>&1 &")
        results = []

        async def long_step() -> None:
            results.append(await sh(sandbox, "sleep 500", timeout_s=60))

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_step)
            await anyio.sleep(1.0)
            await sandbox.kill()
        ((result, _out),) = results
        assert result.cancelled
        assert not result.timed_out
        again, _ = await sh(sandbox, "echo should-not-run")
        assert again.cancelled

        inner = sandbox.slot.client()  # type: ignore[attr-defined]
        listing = inner.exec_create(LAB_NAME, ["ps", "-eo", "args"])
        text = inner.exec_start(listing["Id"]).decode()
        assert "sleep 400" not in text
        assert "sleep 500" not in text


async def test_files_round_trip(provider: DockerSandboxProvider) -> None:
    """write_file creates parents; read_file returns the bytes, or None when missing."""
    async with provider.acquire(lab_job()) as sandbox:
        await sandbox.write_file("/workspaces/lab-one/deep/dir/f.json", b'{"a": 1}')
        assert await sandbox.read_file("/workspaces/lab-one/deep/dir/f.json") == b'{"a": 1}'
        assert await sandbox.read_file("/workspaces/nope.txt") is None
        _result, out = await sh(sandbox, "cat /workspaces/lab-one/deep/dir/f.json")
        assert json.loads(out) == {"a": 1}


async def test_lab_is_killed_when_lease_renewals_stop(provider: DockerSandboxProvider) -> None:
    """Once the worker has renewed a job's lease, the slot kills the lab container when
    renewals stop for longer than the grace (a paused or dead worker), ending its step."""
    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        for _ in range(8):
            await sandbox.lease_renewed()
            await anyio.sleep(0.5)
        result, out = await sh(sandbox, "echo alive")
        assert out == "alive\n"

        started = time.monotonic()
        with anyio.fail_after(30):
            result, out = await sh(sandbox, "sleep 120", timeout_s=120)
        assert not result.ok
        assert time.monotonic() - started < 15
        lab = sandbox.slot.client().inspect_container(LAB_NAME)["State"]
        assert not lab["Running"]


async def test_oom_kill_is_recorded(provider: DockerSandboxProvider) -> None:
    """A step killed by the out-of-memory killer under the slot's memory limit is
    reported as oom_killed, not as a plain failure."""
    async with provider.acquire(lab_job()) as sandbox:
        result, out = await sh(sandbox, "tail /dev/zero", timeout_s=120)
        assert result.oom_killed, (result, out)
        assert result.exit_code == 137
        assert not result.ok

        fine, _ = await sh(sandbox, "exit 3")
        assert fine.exit_code == 3
        assert not fine.oom_killed


async def test_limits_are_applied_to_the_slot(
    provider: DockerSandboxProvider, host_api: docker.APIClient
) -> None:
    """Memory, CPU and process limits from settings are set on the outer container,
    and the process limit holds inside the lab."""
    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        config = host_api.inspect_container(sandbox.slot.container)["HostConfig"]
        assert config["Memory"] == 768 * 1024 * 1024
        assert config["MemorySwap"] == 768 * 1024 * 1024
        assert config["NanoCpus"] == 1_000_000_000
        assert config["PidsLimit"] == 400
        _result, out = await sh(
            sandbox,
            "busybox sh -c 'for i in $(seq 500); do sleep 20 >/dev/null 2>&1 & done' 2>&1 | tail -1; echo done",
            timeout_s=60,
        )
        assert "fork" in out or "Resource temporarily unavailable" in out, out


async def test_cancelling_the_caller_kills_the_step(provider: DockerSandboxProvider) -> None:
    """Cancelling the task that awaits run() kills the step before the cancel propagates."""
    async with provider.acquire(lab_job()) as sandbox:
        with anyio.move_on_after(1.0):
            await sh(sandbox, "sleep 600")
        _, ps = await sh(sandbox, "ps -eo args | grep -c '^sleep 600' || true")
        assert ps.strip() == "0"


async def test_settings_are_validated(docker_settings) -> None:  # type: ignore[no-untyped-def]
    """A wrong isolation mode or a bad lab mount is refused naming the setting."""
    with pytest.raises(ConfigError, match=r"docker_isolation.*'privileged'"):
        DockerSandboxProvider(docker_settings(docker_isolation="privileged"), "w")
    with pytest.raises(ConfigError, match=r"docker_lab_mounts.*'relative/path'"):
        DockerSandboxProvider(docker_settings(docker_lab_mounts=("relative/path",)), "w")


async def test_sysbox_mode_needs_the_runtime(docker_settings) -> None:  # type: ignore[no-untyped-def]
    """Sysbox isolation on an engine without sysbox-runc is refused with the way out."""
    provider = DockerSandboxProvider(docker_settings(docker_isolation="sysbox"), "w-sysbox")
    with pytest.raises(SandboxError, match=r"sysbox-runc.*docker_isolation=nested-docker"):
        await provider.open(1)
    await provider.close()
