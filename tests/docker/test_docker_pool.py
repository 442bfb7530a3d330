"""The warm slot pool against a real engine: isolation, reset, rebuild, leftovers, faults."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import docker
import docker.errors
import pytest

from orbital.sandboxes import docker_slot
from orbital.sandboxes.docker import DockerSandbox, DockerSandboxProvider
from orbital.sandboxes.docker_engine import LAB_NAME, orbital_labels
from tests.docker.conftest import LAB_IMAGE, ProviderFactory, lab_job, sh, wait_until

pytestmark = pytest.mark.anyio

# A job that uses the slot's own Docker daemon (through the socket mounted into the
# lab) the way a k3d lab does: a container with a volume, a named volume, a network.
_DOCKER_API = "curl -sf --unix-socket /var/run/docker.sock -H 'Content-Type: application/json'"
START_INNER_THINGS = f"""set -e
{_DOCKER_API} -d '{{"Image":"{LAB_IMAGE}","Cmd":["sleep","1000"],
  "HostConfig":{{"Binds":["jobdata:/data"]}}}}' 'http://d/containers/create?name=job-box' >/dev/null
{_DOCKER_API} -X POST http://d/containers/job-box/start
{_DOCKER_API} -d '{{"Name":"job-volume"}}' http://d/volumes/create >/dev/null
{_DOCKER_API} -d '{{"Name":"job-net"}}' http://d/networks/create >/dev/null
mkdir -p /workspaces/lab-one/sub && echo data > /workspaces/lab-one/sub/file && touch /workspaces/.hidden
echo started
"""


def _states(provider: DockerSandboxProvider) -> list[str]:
    return [s["state"] for s in provider.describe()["slots"]]


async def _all_ready(provider: DockerSandboxProvider) -> bool:
    return all(state == "ready" for state in _states(provider))


async def test_two_jobs_at_once_cannot_see_each_other(open_provider: ProviderFactory) -> None:
    """Two jobs running at once in two slots see neither the other's processes, files,
    containers nor its published port."""
    provider = await open_provider(2)
    assert provider.ready_capacity(5) == 2
    async with (
        provider.acquire(lab_job("acme/lab-a")) as a,
        provider.acquire(lab_job("acme/lab-b")) as b,
    ):
        assert isinstance(a, DockerSandbox)
        assert isinstance(b, DockerSandbox)
        assert a.slot is not b.slot
        result, out = await sh(
            a,
            f"{START_INNER_THINGS}\n"
            "echo secret > /workspaces/secret-a; nohup sleep 777 >/dev/null 2>&1 &\n"
            "mkdir -p /workspaces/www && echo a-page > /workspaces/www/index.html\n"
            'busybox httpd -p "$K3D_LB_HTTP_PORT" -h /workspaces/www',
        )
        assert result.exit_code == 0, out

        probe = (
            "ls -A /workspaces; ps -eo args | grep -c '^sleep 777' || true;"
            f" {_DOCKER_API} 'http://d/containers/json?all=1' | jq -r '.[].Names[0]';"
            f" curl -s -m 3 http://127.0.0.1:{a.slot.port}/index.html || echo no-port"
        )
        result, out = await sh(b, probe)
        lines = out.split()
        assert "secret-a" not in lines
        assert "job-box" not in out
        assert "a-page" not in out
        # lab-b is B's own (empty) repository directory, made when its lab started.
        assert lines == [".orbital", "lab-b", "0", f"/{LAB_NAME}", "no-port"], out

        result, out = await sh(a, probe)
        assert "secret-a" in out
        assert "/job-box" in out
        assert "a-page" in out


async def test_reset_leaves_nothing_behind(open_provider: ProviderFactory) -> None:
    """After a job that started containers, volumes and networks in its slot and wrote
    files, the reset slot holds only the lab image and an empty workspace, in < 3 s."""
    provider = await open_provider(1)
    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        slot = sandbox.slot
        result, out = await sh(sandbox, START_INNER_THINGS)
        assert result.exit_code == 0, out
        assert len(slot.client().containers(all=True)) == 2

    released = time.monotonic()
    await wait_until(lambda: _all_ready(provider), 30, "the slot to be reset")
    reset_s = time.monotonic() - released
    assert reset_s < 3.0, f"reset took {reset_s:.2f} s"

    inner = slot.client()
    assert inner.containers(all=True) == []
    assert inner.volumes()["Volumes"] in (None, [])
    assert sorted(n["Name"] for n in inner.networks()) == ["bridge", "host", "none"]
    assert [i["Id"] for i in inner.images(all=True)] == [slot.lab_image_id]
    assert slot.outer_exec(["find", "/workspaces", "-mindepth", "1"]) == ""
    slot.verify_empty()

    async with provider.acquire(lab_job()) as again:
        _result, out = await sh(again, "ls -A /workspaces /workspaces/lab-one")
        assert out.split() == ["/workspaces:", ".orbital", "lab-one", "/workspaces/lab-one:"]


async def test_killed_slot_container_is_rebuilt(
    open_provider: ProviderFactory, host_api: docker.APIClient
) -> None:
    """An idle slot whose outer container is killed is noticed, rebuilt in the
    background under a new container, and serves jobs again."""
    provider = await open_provider(1)
    old = provider.describe()["slots"][0]["container"]
    host_api.kill(old)

    async def replaced() -> bool:
        slot = provider.describe()["slots"][0]
        return slot["state"] == "ready" and slot["container"] != old

    await wait_until(replaced, 90, "the killed slot to be rebuilt")
    assert host_api.containers(all=True, filters={"name": old}) == []
    async with provider.acquire(lab_job()) as sandbox:
        result, _ = await sh(sandbox, "true")
        assert result.exit_code == 0


async def test_timed_out_job_gets_a_rebuilt_slot(open_provider: ProviderFactory) -> None:
    """A slot whose job timed out is rebuilt (new container) before it is lent again;
    capacity counts it only when warm."""
    provider = await open_provider(1)
    async with provider.acquire(lab_job()) as sandbox:
        result, _ = await sh(sandbox, "sleep 60", timeout_s=0.5)
        assert result.timed_out
        old = sandbox.slot.container  # type: ignore[attr-defined]
    assert _states(provider) == ["rebuilding"]
    assert provider.ready_capacity(1) == 0
    await wait_until(lambda: _all_ready(provider), 90, "the slot to be rebuilt")
    assert provider.describe()["slots"][0]["container"] != old
    assert provider.ready_capacity(1) == 1


async def test_leftovers_of_a_crashed_worker_are_removed_at_start(
    open_provider: ProviderFactory, host_api: docker.APIClient, docker_settings: Any
) -> None:
    """Containers and volumes labelled with this worker (from a crashed run) are removed
    when it starts; another worker's are left alone."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    mine = orbital_labels(prefix, "w-crashed", 0)
    other = orbital_labels(prefix, "w-alive", 0)
    host_api.create_volume(f"{prefix}-leftover-vol", labels=mine)
    for name, labels in ((f"{prefix}-mine", mine), (f"{prefix}-other", other)):
        box = host_api.create_container(LAB_IMAGE, ["sleep", "1000"], name=name, labels=labels)
        host_api.start(box["Id"])

    try:
        await open_provider(1, worker="w-crashed", prefix=prefix)
        names = {c["Names"][0] for c in host_api.containers(all=True, filters={"name": prefix})}
        assert f"/{prefix}-mine" not in names
        assert f"/{prefix}-other" in names
        volumes = host_api.volumes(filters={"name": f"{prefix}-leftover-vol"})["Volumes"] or []
        assert volumes == []
    finally:
        host_api.remove_container(f"{prefix}-other", force=True)


async def test_slots_that_fail_to_warm_are_reported(
    open_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up runs in parallel up to warm_concurrency, retries each slot, and a slot
    that never warms is reported with its error and not counted as capacity."""
    active, peak, calls = 0, 0, 0
    lock = threading.Lock()
    real_build = docker_slot.Slot.build

    def spying_build(self: docker_slot.Slot) -> None:
        nonlocal active, peak, calls
        with lock:
            active, calls = active + 1, calls + 1
            peak = max(peak, active)
        try:
            time.sleep(0.3)  # hold the slot's warm-up open long enough to overlap
            real_build(self)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(docker_slot.Slot, "build", spying_build)
    provider = await open_provider(
        3,
        docker_outer_image="orbital-test/no-such-outer:latest",
        docker_warm_concurrency=2,
        docker_warm_attempts=2,
        docker_rebuild_backoff_s=0.1,
    )
    assert peak == 2
    assert calls >= 6
    assert provider.ready_capacity(3) == 0
    slots = provider.describe()["slots"]
    assert all(s["state"] in ("failed", "rebuilding") for s in slots)
    assert all("orbital-test/no-such-outer:latest" in s["error"] for s in slots)


async def test_lab_image_change_is_picked_up_at_reset(
    open_provider: ProviderFactory, host_api: docker.APIClient
) -> None:
    """When the lab image changes on the host, a slot loads the new one at its next
    reset, and the next job runs on it."""
    tag = f"orbital-test/lab-change-{uuid.uuid4().hex[:8]}"
    host_api.tag(LAB_IMAGE, tag, "latest")
    try:
        provider = await open_provider(1, docker_lab_image=f"{tag}:latest")
        async with provider.acquire(lab_job()) as sandbox:
            old_id = sandbox.slot.lab_image_id  # type: ignore[attr-defined]
            box = host_api.create_container(LAB_IMAGE, ["sh", "-c", "echo v2 > /lab-version"])
            host_api.start(box["Id"])
            host_api.wait(box["Id"])
            host_api.commit(box["Id"], repository=tag, tag="latest")
            host_api.remove_container(box["Id"])

        await wait_until(lambda: _all_ready(provider), 60, "the slot to reset")
        async with provider.acquire(lab_job()) as sandbox:
            slot = sandbox.slot  # type: ignore[attr-defined]
            assert slot.lab_image_id != old_id
            assert [i["Id"] for i in slot.client().images()] == [slot.lab_image_id]
            _result, out = await sh(sandbox, "cat /lab-version")
            assert out.strip() == "v2"
    finally:
        host_api.remove_image(f"{tag}:latest", force=True)


class _RefusingClient:
    """Wraps a slot's inner client; refuses every exec that would kill a step."""

    def __init__(self, real: docker.APIClient) -> None:
        self._real = real

    def exec_create(self, container: str, cmd: Any, **kwargs: Any) -> Any:
        if isinstance(cmd, list) and ("orbital-kill" in cmd or "kill -KILL -1; exit 0" in cmd):
            raise docker.errors.APIError("injected fault: daemon refuses to kill")
        return self._real.exec_create(container, cmd, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_daemon_refusing_to_kill_does_not_block(
    open_provider: ProviderFactory, host_api: docker.APIClient
) -> None:
    """When the daemon refuses every kill, the step still ends as timed out within
    bounded attempts, the job finishes, and the slot is rebuilt; a refused removal of
    the old outer container is retried with backoff without blocking anything."""
    provider = await open_provider(1)
    removal_refusals = 0
    real_remove = host_api.remove_container

    async with provider.acquire(lab_job()) as sandbox:
        assert isinstance(sandbox, DockerSandbox)
        slot = sandbox.slot
        slot.inner = _RefusingClient(slot.client())  # type: ignore[assignment]
        started = time.monotonic()
        result, _ = await sh(sandbox, "sleep 120", timeout_s=0.5)
        assert result.timed_out
        assert time.monotonic() - started < 10
        assert sandbox.needs_rebuild == "a step could not be killed"

        def refusing_remove(container: str, **kwargs: Any) -> None:
            nonlocal removal_refusals
            if container == old and removal_refusals < 3:
                removal_refusals += 1
                raise docker.errors.APIError("injected fault: could not kill running container")
            real_remove(container, **kwargs)

        old = slot.container
        slot.host = _HostProxy(host_api, refusing_remove)  # type: ignore[assignment]
        ended = time.monotonic()

    assert time.monotonic() - ended < 1.0
    await wait_until(lambda: _all_ready(provider), 120, "the slot to be rebuilt")
    assert removal_refusals == 3
    assert provider.describe()["slots"][0]["container"] != old
    assert host_api.containers(all=True, filters={"name": old}) == []


class _HostProxy:
    """The host client with remove_container replaced (an injected fault)."""

    def __init__(self, real: docker.APIClient, remove: Any) -> None:
        self._real = real
        self.remove_container = remove

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_close_removes_every_slot(docker_settings: Any, host_api: docker.APIClient) -> None:
    """Closing the provider removes its outer containers and their volumes."""
    settings = docker_settings()
    provider = DockerSandboxProvider(settings, "w-close")
    await provider.open(1)
    names = [s["container"] for s in provider.describe()["slots"]]
    await provider.close()
    label = f"org.orbital.managed={settings.prefix}"
    assert host_api.containers(all=True, filters={"label": label}) == []
    assert (host_api.volumes(filters={"label": label})["Volumes"] or []) == []
    assert names
    assert all(n.startswith("orbital-w-close-slot0-") for n in names)
    assert provider.ready_capacity(1) == 0
