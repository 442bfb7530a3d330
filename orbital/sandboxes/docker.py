"""The Docker sandbox: each job runs in a lab container inside its own warm slot.

A slot is an outer container that runs its own Docker daemon (see
:mod:`orbital.sandboxes.docker_slot`); the pool keeps one per capacity unit warm
(:mod:`orbital.sandboxes.docker_pool`). For a job, :class:`DockerSandbox` starts
the lab container from the framework image inside the slot, with ``/workspaces``
mounted (the repository goes to ``/workspaces/<name>``, the working directory),
the inner daemon's socket, and the lab's env file; every step is an exec in that
container with live output (:mod:`orbital.sandboxes.docker_exec`).

Isolation modes (``docker_isolation``), reported in the worker registration and
every build record:

- ``sysbox``: outer containers under the Sysbox runtime, no added privileges.
- ``nested-docker``: the default runtime with SYS_ADMIN and NET_ADMIN and no
  seccomp filter, never ``--privileged``. Jobs cannot see each other, but a
  kernel or runtime escape from the outer container reaches the host more
  easily than under Sysbox; use it only where Sysbox cannot be installed.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import docker
import docker.errors

from orbital.errors import ConfigError, SandboxError
from orbital.jobs import Job
from orbital.sandboxes.base import OutputCallback, Sandbox, SandboxProvider, StepResult
from orbital.sandboxes.docker_engine import (
    DOCKER_ERRORS,
    LAB_NAME,
    LEASE_POLL_S,
    LEASE_WATCHDOG,
    WORKSPACES,
    engine_ready,
    env_file,
    file_archive,
    git_url_mounts,
    orbital_labels,
    parse_lab_mounts,
)
from orbital.sandboxes.docker_exec import ExecStream, StepProcess, kill_all, kill_step, start_step
from orbital.sandboxes.docker_pool import PoolTiming, SlotPool
from orbital.sandboxes.docker_slot import Slot, SlotConfig
from orbital.sandboxes.select import LEASE_GRACE_SHARE
from orbital.settings import Settings

__all__ = ["ISOLATION_MODES", "DockerSandbox", "DockerSandboxProvider", "engine_ready"]

logger = logging.getLogger(__name__)

ISOLATION_MODES = ("sysbox", "nested-docker")
#: How long a killed step may keep printing before its stream is closed.
_DRAIN_S = 2.0
# The lab container's PID 1: a shell that sleeps in a loop and reaps orphans. It is not
# docker-init, because kill() kills every other process in the container (kill -1) and
# tini would exit with its child; this loop just starts a new sleep.
_KEEPALIVE = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"]


class DockerSandbox(Sandbox):
    """A job's view of one warm slot: its lab container and the steps run in it."""

    kind = "docker"

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.isolation = slot.config.isolation
        self.lab = ""
        self.job_id = ""
        #: Set when the slot must be rebuilt rather than reset after this job.
        self.needs_rebuild = ""
        self._cancelled = False
        self._watched = False
        self._renewals = 0
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def workspace(self) -> str:
        return WORKSPACES

    def repo_dir(self, job: Job) -> str:
        return str(PurePosixPath(WORKSPACES) / job.repo.split("/")[-1])

    def lab_env(self, job: Job) -> dict[str, str]:
        """The lab container's environment (also written to ``/workspaces/.orbital/lab.env``).

        Only K3D_LB_HTTP_PORT is published on the host; the HTTPS and API ports exist
        inside the slot's own network namespace, so they cannot clash between slots.
        """
        port = self.slot.port
        https = port + 10000 if port + 10000 < 65536 else port - 10000
        return {
            "K3D_CLUSTER_NAME": f"orbital-slot{self.slot.index}",
            "K3D_LB_HTTP_PORT": str(port),
            "K3D_LB_HTTPS_PORT": str(https),
            "K3D_API_PORT": "6444",
            "ORBITAL_SLOT": str(self.slot.index),
            "ORBITAL_SLOT_PORT": str(port),
            "ORBITAL_SANDBOX": f"docker/{self.isolation}",
            "ORBITAL_JOB_ID": job.id,
            "REPOSITORY_NAME": job.repo.split("/")[-1],
        }

    async def start(self, job: Job) -> None:
        self.job_id = job.id
        self._cancelled = False
        await anyio.to_thread.run_sync(self._start_lab, job)

    def _start_lab(self, job: Job) -> None:
        slot, cfg = self.slot, self.slot.config
        inner = slot.client()
        env = self.lab_env(job)
        slot.put_file(f"{WORKSPACES}/.orbital/lab.env", env_file(env))
        binds = [f"{WORKSPACES}:{WORKSPACES}", "/var/run/docker.sock:/var/run/docker.sock"]
        binds += [f"{source}:{target}:ro" for source, target in cfg.lab_mounts]
        try:
            created = inner.create_container(
                cfg.lab_image,
                name=LAB_NAME,
                entrypoint=_KEEPALIVE,
                command=[],
                environment=env,
                working_dir=self.repo_dir(job),
                labels=orbital_labels(cfg.prefix, cfg.worker_id, slot.index, job.id),
                host_config=inner.create_host_config(network_mode="host", binds=binds),
            )
            inner.start(created["Id"])
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"slot {slot.base_name}: cannot start the lab container for job {job.id} "
                f"from {cfg.lab_image!r}: {err}"
            ) from err
        self.lab = str(created["Id"])

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout_s: float,
        on_output: OutputCallback,
    ) -> StepResult:
        if self._cancelled:
            return StepResult(exit_code=None, duration_s=0.0, cancelled=True)
        try:
            return await self._run(argv, env=env, cwd=cwd, timeout_s=timeout_s, on_output=on_output)
        except DOCKER_ERRORS as err:
            self.needs_rebuild = self.needs_rebuild or "the slot's daemon failed"
            raise SandboxError(
                f"slot {self.slot.base_name}: job {self.job_id}: running {argv[0]!r} failed: {err}"
            ) from err

    async def _run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout_s: float,
        on_output: OutputCallback,
    ) -> StepResult:
        started = time.monotonic()
        inner = self.slot.client()
        step = await anyio.to_thread.run_sync(
            lambda: start_step(inner, self.lab, argv, env=env, cwd=cwd)
        )
        try:
            interrupted = await self._stream(step, timeout_s, on_output)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._kill(step)
            self.needs_rebuild = self.needs_rebuild or "a step was interrupted"
            raise

        duration = time.monotonic() - started
        if interrupted:
            self.needs_rebuild = self.needs_rebuild or (
                "cancelled" if self._cancelled else "step timed out"
            )
            return StepResult(
                exit_code=None,
                duration_s=duration,
                timed_out=not self._cancelled,
                cancelled=self._cancelled,
            )
        code = await anyio.to_thread.run_sync(
            lambda: inner.exec_inspect(step.exec_id).get("ExitCode")
        )
        oom = code != 0 and await self._oom_happened()
        return StepResult(exit_code=code, duration_s=duration, oom_killed=oom)

    async def _stream(self, step: StepProcess, timeout_s: float, on_output: OutputCallback) -> bool:
        """Forward the step's output until it ends; on timeout or :meth:`kill`, kill its
        process group and return True."""
        version = str(self.slot.client().api_version)
        async with ExecStream(self.slot.socket_path, version, step.exec_id) as stream:
            with anyio.move_on_after(timeout_s) as scope:
                self._scopes.add(scope)
                try:
                    await stream.pump(on_output)
                finally:
                    self._scopes.discard(scope)
            if not scope.cancelled_caught:
                return False
            await self._kill(step)
            with anyio.move_on_after(_DRAIN_S):
                await stream.pump(on_output)
        return True

    async def _kill(self, step: StepProcess) -> None:
        attempts = self.slot.config.kill_attempts
        inner = self.slot.client()
        killed = False
        # A daemon that hangs instead of refusing must not hold the worker either: stop
        # waiting after one API timeout (the thread finishes on its own) and rebuild.
        with anyio.move_on_after(self.slot.config.api_timeout_s):
            killed = await anyio.to_thread.run_sync(
                lambda: kill_step(inner, self.lab, step, attempts), abandon_on_cancel=True
            )
        if not killed:
            logger.warning(
                "slot %s: job %s: step not killed after %d attempts; the slot will be rebuilt",
                self.slot.base_name,
                self.job_id,
                attempts,
            )
            self.needs_rebuild = "a step could not be killed"

    async def _oom_happened(self) -> bool:
        try:
            happened, counts = await anyio.to_thread.run_sync(
                lambda: self.slot.oom_since(self.slot.oom_baseline)
            )
        except SandboxError as err:
            logger.warning("slot %s: cannot read the OOM counters: %s", self.slot.base_name, err)
            return False
        self.slot.oom_baseline = counts
        if happened:
            logger.warning(
                "slot %s: job %s: the out-of-memory killer struck in the slot",
                self.slot.base_name,
                self.job_id,
            )
        return happened

    async def lease_renewed(self) -> None:
        """Count a renewal in the slot's lease file; the first call also starts the
        watchdog in the slot that kills the lab when renewals stop (``LEASE_WATCHDOG``)."""
        self._renewals += 1
        self.slot.lease_file.write_text(str(self._renewals))
        if self._watched:
            return
        polls = str(max(2, math.ceil(self.slot.config.lease_grace_s / LEASE_POLL_S)))
        argv = ["sh", "-c", LEASE_WATCHDOG, "orbital-lease", LAB_NAME, polls]
        try:
            await anyio.to_thread.run_sync(lambda: self.slot.outer_exec(argv, detach=True))
        except SandboxError as err:
            logger.warning(
                "slot %s: job %s: lease watchdog not started (%s); a paused worker's steps "
                "would outlive its lease",
                self.slot.base_name,
                self.job_id,
                err,
            )
            return
        self._watched = True

    async def write_file(self, path: str, data: bytes) -> None:
        archive = file_archive(path, data)
        inner = self.slot.client()
        try:
            await anyio.to_thread.run_sync(lambda: inner.put_archive(self.lab, "/", archive))
        except DOCKER_ERRORS as err:
            raise SandboxError(f"slot {self.slot.base_name}: cannot write {path}: {err}") from err

    async def read_file(self, path: str) -> bytes | None:
        inner = self.slot.client()

        def read() -> bytes | None:
            try:
                chunks, _stat = inner.get_archive(self.lab, path)
                data = b"".join(chunks)
            except docker.errors.NotFound:
                return None
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                member = tar.next()
                handle = tar.extractfile(member) if member is not None else None
                return handle.read() if handle is not None else None

        try:
            return await anyio.to_thread.run_sync(read)
        except DOCKER_ERRORS as err:
            raise SandboxError(f"slot {self.slot.base_name}: cannot read {path}: {err}") from err

    async def kill(self) -> None:
        """Kill every process in the lab container (not only the running steps)."""
        self._cancelled = True
        self.needs_rebuild = "cancelled"
        for scope in list(self._scopes):
            scope.cancel()
        if not self.lab:
            return
        inner = self.slot.client()
        attempts = self.slot.config.kill_attempts
        if not await anyio.to_thread.run_sync(lambda: kill_all(inner, self.lab, attempts)):
            logger.warning(
                "slot %s: job %s: kill refused by the daemon; slot will be rebuilt",
                self.slot.base_name,
                self.job_id,
            )

    async def reset(self) -> None:
        await anyio.to_thread.run_sync(self.slot.clean)
        self.lab = ""

    async def destroy(self) -> None:
        if not await anyio.to_thread.run_sync(self.slot.destroy):
            raise SandboxError(
                f"slot {self.slot.base_name}: container {self.slot.container} not removed"
            )

    def shell_argv(self, shell: str = "bash") -> list[str]:
        """A host command that opens an interactive shell in the lab container."""
        return ["docker", "-H", f"unix://{self.slot.socket_path}", "exec", "-it", LAB_NAME, shell]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "isolation": self.isolation,
            "slot": self.slot.index,
            "container": self.slot.container,
            "port": self.slot.port,
            "lab_image": self.slot.config.lab_image,
            "lab_image_id": self.slot.lab_image_id,
        }


class DockerSandboxProvider(SandboxProvider):
    """Lends warm Docker slots to a worker's jobs (``--sandbox docker``)."""

    kind = "docker"

    def __init__(self, settings: Settings, worker_id: str) -> None:
        if settings.docker_isolation not in ISOLATION_MODES:
            raise ConfigError(
                "setting docker_isolation (ORBITAL_DOCKER_ISOLATION) = "
                f"{settings.docker_isolation!r}: expected one of {', '.join(ISOLATION_MODES)}"
            )
        if not settings.docker_memory:
            raise ConfigError("setting docker_memory (ORBITAL_DOCKER_MEMORY) must not be empty")
        self.settings = settings
        self.worker_id = worker_id
        self.isolation = settings.docker_isolation
        try:
            mounts = parse_lab_mounts(settings.docker_lab_mounts)
        except SandboxError as err:
            raise ConfigError(str(err)) from None
        mounts += tuple(m for m in git_url_mounts(settings.git_url_template) if m not in mounts)
        self.config = SlotConfig(
            prefix=settings.prefix,
            worker_id=worker_id,
            isolation=settings.docker_isolation,
            runtime=settings.docker_runtime,
            outer_image=settings.docker_outer_image,
            lab_image=settings.docker_lab_image,
            memory=settings.docker_memory,
            cpus=settings.docker_cpus,
            pids_limit=settings.docker_pids_limit,
            port_base=settings.docker_port_base,
            bind_address=settings.docker_bind_address,
            slot_dir=_slot_dir(settings),
            lab_mounts=mounts,
            api_timeout_s=settings.docker_api_timeout_s,
            ready_timeout_s=settings.docker_ready_timeout_s,
            kill_attempts=settings.docker_kill_attempts,
            lease_grace_s=settings.lease_s * LEASE_GRACE_SHARE,
        )
        self.timing = PoolTiming(
            warm_concurrency=settings.docker_warm_concurrency,
            warm_attempts=settings.docker_warm_attempts,
            backoff_s=settings.docker_rebuild_backoff_s,
            backoff_max_s=settings.docker_rebuild_backoff_max_s,
            health_interval_s=settings.docker_health_interval_s,
            take_timeout_s=max(settings.docker_ready_timeout_s * 2, 60.0),
        )
        self.host: docker.APIClient | None = None
        self.pool: SlotPool | None = None
        self._running: dict[str, DockerSandbox] = {}

    async def open(self, capacity: int) -> None:
        """Connect to the engine, check the isolation mode is possible, and warm
        ``capacity`` slots.

        Raises:
            SandboxError: if the engine cannot be reached or lacks the Sysbox runtime.
        """
        self.host = await anyio.to_thread.run_sync(self._connect)
        if self.isolation == "nested-docker":
            logger.warning(
                "worker %s: docker sandbox in nested-docker mode: outer containers run with "
                "SYS_ADMIN and NET_ADMIN under the default runtime, which is weaker isolation "
                "than Sysbox (docker_isolation=sysbox)",
                self.worker_id,
            )
        self.pool = SlotPool(self.config, self.host, self.timing)
        await self.pool.open(capacity)

    def _connect(self) -> docker.APIClient:
        url = self.settings.docker_host
        try:
            host = docker.APIClient(base_url=url, timeout=int(self.settings.docker_api_timeout_s))
            runtimes = host.info().get("Runtimes") or {}
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"setting docker_host={url!r}: Docker engine not reachable: {err}"
            ) from err
        if self.isolation == "sysbox" and self.settings.docker_runtime not in runtimes:
            host.close()
            raise SandboxError(
                f"docker_isolation=sysbox needs the runtime {self.settings.docker_runtime!r}, "
                f"which the engine at {url} does not have (it has: {', '.join(sorted(runtimes))}); "
                "install Sysbox or set docker_isolation=nested-docker (weaker isolation)"
            )
        return host

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.host is not None:
            self.host.close()

    def ready_capacity(self, requested: int) -> int:
        if self.pool is None:
            return 0
        return min(requested, self.pool.capacity())

    def acquire(self, job: Job) -> Any:
        return self._acquire(job)

    @asynccontextmanager
    async def _acquire(self, job: Job) -> AsyncIterator[Sandbox]:
        if self.pool is None:
            raise SandboxError(f"worker {self.worker_id}: docker sandbox provider is not open")
        slot = await self.pool.take()
        sandbox = DockerSandbox(slot)
        self._running[job.id] = sandbox
        try:
            await sandbox.start(job)
            yield sandbox
        except BaseException as err:
            if isinstance(err, (anyio.get_cancelled_exc_class(), SandboxError)):
                sandbox.needs_rebuild = sandbox.needs_rebuild or type(err).__name__
            raise
        finally:
            self._running.pop(job.id, None)
            slot.lease_file.unlink(missing_ok=True)  # stops the slot's lease watchdog
            self.pool.give_back(
                slot, rebuild=bool(sandbox.needs_rebuild), reason=sandbox.needs_rebuild
            )

    def running(self, job_id: str) -> DockerSandbox | None:
        """The sandbox of a job this provider is running now (e.g. a daemon job an
        operator wants a shell in, see :meth:`DockerSandbox.shell_argv`), or None."""
        return self._running.get(job_id)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "isolation": self.isolation,
            "runtime": self.settings.docker_runtime if self.isolation == "sysbox" else "default",
            "outer_image": self.settings.docker_outer_image,
            "lab_image": self.settings.docker_lab_image,
            "slots": self.pool.describe() if self.pool is not None else [],
        }


def _slot_dir(settings: Settings) -> Path:
    return Path(settings.docker_slot_dir) if settings.docker_slot_dir else settings.home / "slots"
