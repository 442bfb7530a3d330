"""The local sandbox: lab steps as child processes in a private work directory.

This is the embedded default for laptops and the demo. It is NOT an isolation
boundary: steps run as the worker's user with its network and file system
access, which the provider says in a warning when it starts.

Each step runs in its own session (so its own process group). Every process a
step starts inherits ``ORBITAL_SANDBOX_ROOT`` in its environment, so a kill also
finds processes that left the group (``setsid``, double forks) by scanning
``/proc``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from orbital.errors import SandboxError
from orbital.jobs import Job
from orbital.sandboxes.base import OutputCallback, Sandbox, SandboxProvider, StepResult

__all__ = ["LocalSandbox", "LocalSandboxProvider"]

logger = logging.getLogger(__name__)

_KILL_GRACE_S = 2.0
_READ_SIZE = 65536
_WATCHDOG = str(Path(__file__).with_name("watchdog.py"))
_DRAIN_S = 0.5
_BASE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")


class LocalSandbox(Sandbox):
    """A private directory and the process groups of the steps run in it."""

    kind = "local"
    isolation = "none"

    def __init__(self, root: Path, sandbox_id: str, lease_grace_s: float | None = None) -> None:
        self.root = root
        self.sandbox_id = sandbox_id
        self.lease_grace_s = lease_grace_s
        self.lease_file = root.parent / f"{root.name}.lease"
        self._groups: set[int] = set()
        self._killed = False

    @property
    def workspace(self) -> str:
        return str(self.root / "workspaces")

    def repo_dir(self, job: Job) -> str:
        return str(self.root / "workspaces" / job.repo.split("/")[-1])

    async def start(self, job: Job) -> None:
        try:
            if self.root.exists():
                shutil.rmtree(self.root)
            (self.root / "workspaces").mkdir(parents=True)
            (self.root / "home").mkdir()
            (self.root / "tmp").mkdir()
        except OSError as err:
            raise SandboxError(
                f"local sandbox {self.sandbox_id}: cannot prepare {self.root}: {err}"
            ) from err
        self._killed = False

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(
            HOME=str(self.root / "home"),
            TMPDIR=str(self.root / "tmp"),
            ORBITAL_SANDBOX_ID=self.sandbox_id,
            ORBITAL_SANDBOX_ROOT=str(self.root),
        )
        env.update(extra)
        return env

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout_s: float,
        on_output: OutputCallback,
    ) -> StepResult:
        if self._killed:
            return StepResult(exit_code=None, duration_s=0.0, cancelled=True)
        started = time.monotonic()
        command = list(argv)
        if self.lease_grace_s is not None:
            # Run the watchdog by path in isolated mode: importing the orbital
            # package (pandas and all) would add about a second to every step.
            command = [
                sys.executable,
                "-I",
                _WATCHDOG,
                str(self.lease_file),
                f"{self.lease_grace_s:g}",
                "--",
                *command,
            ]
            self.lease_file.touch()
        try:
            process = await anyio.open_process(
                command,
                cwd=cwd,
                env=self._env(env),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as err:
            message = f"cannot start {argv[0]!r}: {err.strerror or err}\n"
            await on_output(message.encode())
            return StepResult(exit_code=127, duration_s=time.monotonic() - started)

        self._groups.add(process.pid)
        timed_out = False
        try:
            with anyio.move_on_after(timeout_s) as scope:
                async with anyio.create_task_group() as tg:
                    eof = anyio.Event()
                    tg.start_soon(_pump, process, on_output, eof)
                    await process.wait()
                    # Background processes the step left may hold the pipe open:
                    # read what is there, then stop waiting for EOF.
                    with anyio.move_on_after(_DRAIN_S):
                        await eof.wait()
                    tg.cancel_scope.cancel()
            timed_out = scope.cancelled_caught
        finally:
            if process.returncode is None:
                with anyio.CancelScope(shield=True):
                    await self._kill_group(process.pid)
                    await process.wait()
            with anyio.CancelScope(shield=True):
                await process.aclose()

        duration = time.monotonic() - started
        if timed_out or self._killed:
            return StepResult(
                exit_code=None, duration_s=duration, timed_out=timed_out, cancelled=self._killed
            )
        return StepResult(exit_code=process.returncode, duration_s=duration)

    async def _kill_group(self, pgid: int) -> None:
        for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _group_alive(pgid):
                    return
                await anyio.sleep(0.05)

    async def lease_renewed(self) -> None:
        if self.lease_grace_s is not None:
            self.lease_file.touch()

    async def write_file(self, path: str, data: bytes) -> None:
        target = Path(path)
        await anyio.to_thread.run_sync(lambda: _write(target, data))

    async def read_file(self, path: str) -> bytes | None:
        target = Path(path)
        try:
            return await anyio.Path(target).read_bytes()
        except FileNotFoundError:
            return None

    async def kill(self) -> None:
        self._killed = True
        await self._kill_everything()

    async def _kill_everything(self) -> None:
        for pgid in list(self._groups):
            await self._kill_group(pgid)
        self._groups.clear()
        for pid in _pids_with_marker(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    async def reset(self) -> None:
        await self._kill_everything()
        self._killed = False
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))
        self.lease_file.unlink(missing_ok=True)
        if self.root.exists():
            raise SandboxError(f"local sandbox {self.sandbox_id}: {self.root} could not be removed")

    async def destroy(self) -> None:
        await self.reset()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "isolation": self.isolation, "root": str(self.root)}


async def _pump(process: anyio.abc.Process, on_output: OutputCallback, eof: anyio.Event) -> None:
    stream = process.stdout
    try:
        while stream is not None:
            try:
                chunk = await stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await on_output(chunk)
    finally:
        eof.set()


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; treat a group of zombies as gone.
    return any(_is_running(pid) for pid in _pids_in_group(pgid))


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _sandbox_pids() -> list[tuple[int, str]]:
    """(pid, sandbox root) of every process that carries an ``ORBITAL_SANDBOX_ROOT``.

    Matching on the root directory (not the worker's name) keeps two installations
    on one host, or two test sessions, from killing each other's steps.
    """
    found = []
    prefix = b"ORBITAL_SANDBOX_ROOT="
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                found.append((int(entry.name), item[len(prefix) :].decode(errors="replace")))
    return found


def _pids_with_marker(root: str) -> list[int]:
    return [pid for pid, found in _sandbox_pids() if found == root]


class LocalSandboxProvider(SandboxProvider):
    """Makes a fresh local sandbox for each job under ``<work_dir>/<worker>``."""

    kind = "local"
    isolation = "none"

    def __init__(self, work_dir: Path, worker_id: str, lease_grace_s: float | None = None) -> None:
        self.base = work_dir / worker_id
        self.worker_id = worker_id
        self.lease_grace_s = lease_grace_s

    async def open(self, capacity: int) -> None:
        logger.warning(
            "worker %s: local sandbox in %s is NOT an isolation boundary: lab steps run "
            "as this user with its files and network; use --sandbox docker for untrusted labs",
            self.worker_id,
            self.base,
        )
        await self._remove_leftovers()
        self.base.mkdir(parents=True, exist_ok=True)

    async def _remove_leftovers(self) -> None:
        """Kill processes and remove directories a previous run of this worker left
        (it was killed before it could clean up)."""
        marker = f"{self.base}/"
        pids = [pid for pid, root in _sandbox_pids() if root.startswith(marker)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        if pids or self.base.exists():
            logger.warning(
                "worker %s: removed leftovers of its previous run: %d process(es), directory %s",
                self.worker_id,
                len(pids),
                self.base,
            )
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.base, ignore_errors=True))

    async def close(self) -> None:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.base, ignore_errors=True))

    @asynccontextmanager
    async def _acquire(self, job: Job) -> AsyncIterator[Sandbox]:
        sandbox = LocalSandbox(self.base / job.id, f"{self.worker_id}.{job.id}", self.lease_grace_s)
        await sandbox.start(job)
        try:
            yield sandbox
        finally:
            with anyio.CancelScope(shield=True):
                await sandbox.destroy()

    def acquire(self, job: Job) -> Any:
        return self._acquire(job)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "isolation": self.isolation, "root": str(self.base)}
