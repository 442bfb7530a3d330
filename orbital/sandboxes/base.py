"""The sandbox interface: where a job's steps run.

A :class:`SandboxProvider` belongs to a worker and hands out one
:class:`Sandbox` per running job (the local provider makes a fresh one, the
Docker provider lends a warm slot). The pipeline only talks to these two
classes, so every sandbox runs the same lab the same way.

Paths given to a sandbox are paths *inside* it (for the local sandbox they are
real paths under its private work directory).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from orbital.jobs import Job

__all__ = ["OutputCallback", "Sandbox", "SandboxProvider", "StepResult"]

#: Receives raw output bytes of a running step, in order, as they are produced.
OutputCallback = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class StepResult:
    """How one command ended inside a sandbox.

    ``exit_code`` is None when the process was killed before it exited on its
    own (timeout, cancel) and no exit status could be read.
    """

    exit_code: int | None
    duration_s: float
    timed_out: bool = False
    cancelled: bool = False
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.cancelled or self.oom_killed)


class Sandbox(abc.ABC):
    """One isolated place to run one job's steps."""

    #: ``local`` or ``docker``.
    kind: str = ""
    #: How strong the boundary is: ``none``, ``sysbox`` or ``nested-docker``.
    isolation: str = ""

    @property
    @abc.abstractmethod
    def workspace(self) -> str:
        """Directory (inside the sandbox) under which the job's files live."""

    @abc.abstractmethod
    def repo_dir(self, job: Job) -> str:
        """Directory (inside the sandbox) the repository is cloned into."""

    @abc.abstractmethod
    async def start(self, job: Job) -> None:
        """Prepare an empty workspace for ``job``.

        Raises:
            SandboxError: if the sandbox cannot be made ready.
        """

    @abc.abstractmethod
    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout_s: float,
        on_output: OutputCallback,
    ) -> StepResult:
        """Run one command (an argument list, never a shell string) and stream its
        combined stdout and stderr to ``on_output``.

        The command and everything it starts are killed when ``timeout_s`` passes
        (``timed_out``), or when :meth:`kill` is called (``cancelled``). Cancelling
        the calling task also kills the command before the cancellation propagates.
        """

    async def lease_renewed(self) -> None:  # noqa: B027 - optional hook
        """Told after each successful lease renewal. A sandbox that can kill its
        steps on its own when renewals stop (a paused or dead worker) uses this;
        see :mod:`orbital.sandboxes.watchdog`."""

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes) -> None:
        """Create or replace a file inside the sandbox."""

    @abc.abstractmethod
    async def read_file(self, path: str) -> bytes | None:
        """Return a file's bytes from inside the sandbox, or None if it is missing."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill every process the sandbox runs for the current job (cancel)."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Remove everything the last job left (processes, files, containers),
        leaving the sandbox ready for the next job.

        Raises:
            SandboxError: if the sandbox could not be verified clean; the provider
                then rebuilds or discards it.
        """

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Remove the sandbox and everything inside it."""

    def describe(self) -> dict[str, Any]:
        """Facts for the build record and the worker registration."""
        return {"kind": self.kind, "isolation": self.isolation}


class SandboxProvider(abc.ABC):
    """Hands sandboxes to a worker's running jobs."""

    kind: str = ""
    isolation: str = ""

    async def open(self, capacity: int) -> None:  # noqa: B027 - optional hook
        """Get ready to serve up to ``capacity`` jobs at once (warm a pool)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything the provider holds."""

    def ready_capacity(self, requested: int) -> int:
        """How many jobs can run at once now (warm slots for pooled providers)."""
        return requested

    @abc.abstractmethod
    def acquire(self, job: Job) -> AbstractAsyncContextManager[Sandbox]:
        """Return an async context manager that yields a started sandbox for
        ``job`` and resets or discards it on exit."""

    def describe(self) -> dict[str, Any]:
        """Facts for the worker registration."""
        return {"kind": self.kind, "isolation": self.isolation}


@asynccontextmanager
async def started(sandbox: Sandbox, job: Job) -> AsyncIterator[Sandbox]:
    """Start ``sandbox`` for ``job``; destroy it when the block ends."""
    try:
        await sandbox.start(job)
        yield sandbox
    finally:
        await sandbox.destroy()
