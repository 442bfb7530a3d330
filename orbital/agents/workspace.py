"""A private work directory for one agent or sync job.

Agent and sync jobs run git and the agent command on the worker's own host
(they are not labs, so they never use the Docker sandbox), through the same
:class:`~orbital.sandboxes.local.LocalSandbox` lab steps use: each command is
an argument list run in its own process group with a timeout, its output is
streamed to the job log (masked there), and when the workspace closes every
process it started is killed and the directory is removed, checkout included.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from orbital.jobs import Job
from orbital.logs import LogWriter
from orbital.masking import mask_text
from orbital.results import clean_text
from orbital.sandboxes.base import StepResult
from orbital.sandboxes.local import LocalSandbox

__all__ = ["CommandResult", "Workspace", "open_workspace"]

logger = logging.getLogger(__name__)

#: Output kept in memory per command when the caller does not ask for all of it.
_TAIL_BYTES = 16 * 1024
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "LC_ALL": "C"}


@dataclass(frozen=True)
class CommandResult:
    """How one command in a workspace ended, with its output (all of it, or the tail)."""

    argv0: str
    step: StepResult
    output: bytes

    @property
    def ok(self) -> bool:
        return self.step.ok

    def text(self, secrets: Sequence[str], limit: int = 4000) -> str:
        """The kept output as clean, masked text (at most ``limit`` characters, the end)."""
        raw = self.output[-limit * 4 :]
        return mask_text(clean_text(raw, limit * 4), secrets)[-limit:]

    def describe(self) -> str:
        """One phrase for a summary: ``exit code 2``, ``timed out after 30 s``..."""
        if self.step.timed_out:
            took = f"{self.step.duration_s:.0f} s"
            return f"{self.argv0} timed out after {took}; its processes were killed"
        if self.step.cancelled:
            return f"{self.argv0} was cancelled; its processes were killed"
        return f"{self.argv0} exited with code {self.step.exit_code}"


class Workspace:
    """A started local sandbox plus the job log its commands write to.

    Args:
        sandbox: a started :class:`LocalSandbox`.
        log: the job's log; None runs commands without logging their output.
        secrets: values masked in the text this workspace hands back.
    """

    def __init__(
        self, sandbox: LocalSandbox, log: LogWriter | None, secrets: Sequence[str]
    ) -> None:
        self.sandbox = sandbox
        self.log = log
        self.secrets = list(secrets)

    @property
    def root(self) -> Path:
        return self.sandbox.root

    @property
    def checkouts(self) -> Path:
        """Where repositories are cloned (the sandbox's workspace directory)."""
        return Path(self.sandbox.workspace)

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        echo: bool = True,
        capture: bool = False,
    ) -> CommandResult:
        """Run one command (an argument list) in the workspace.

        Args:
            argv: the command; nothing of it passes through a shell.
            cwd: working directory (default: the checkouts directory).
            timeout_s: after this the command and everything it started are killed.
            env: variables added to the sandbox's minimal environment.
            echo: write the output to the job log.
            capture: keep all of the output, not only its tail.
        """
        kept = bytearray()

        async def on_output(chunk: bytes) -> None:
            if echo and self.log is not None:
                await self.log.write(chunk)
            kept.extend(chunk)
            if not capture and len(kept) > 2 * _TAIL_BYTES:
                del kept[: len(kept) - _TAIL_BYTES]

        step = await self.sandbox.run(
            list(argv),
            env={**_GIT_ENV, **(env or {})},
            cwd=str(cwd or self.checkouts),
            timeout_s=timeout_s,
            on_output=on_output,
        )
        if self.log is not None:
            await self.log.flush()
        return CommandResult(Path(argv[0]).name, step, bytes(kept))

    async def clone(
        self,
        url: str,
        branch: str,
        dest: Path,
        *,
        timeout_s: float,
        commit: str = "",
        fetch_ref: str = "",
        shallow: bool = False,
        checkout: bool = True,
    ) -> CommandResult:
        """Clone ``branch`` of ``url`` into ``dest``.

        A missing branch fails the clone; it never falls back to another branch.
        ``fetch_ref`` (e.g. ``refs/pull/7/head``) is fetched afterwards and checked
        out detached, at ``commit`` when given; else ``commit`` alone is checked out.
        ``shallow`` fetches only the branch tip and, where the server allows it, only
        the file contents that are read; ``checkout=False`` leaves the work tree empty.
        """
        argv = ["git", "clone", "--quiet", "--no-tags", "--single-branch", "--branch", branch]
        if shallow:
            argv += ["--depth", "1", "--filter=blob:none"]
        if not checkout:
            argv.append("--no-checkout")
        result = await self.run([*argv, "--", url, str(dest)], timeout_s=timeout_s)
        target = commit
        if result.ok and fetch_ref:
            local = "refs/remotes/origin/orbital-head"
            fetch = ["git", "fetch", "--quiet", "--no-tags", "origin", f"+{fetch_ref}:{local}"]
            result = await self.run(fetch, cwd=dest, timeout_s=timeout_s)
            target = commit or local
        if result.ok and target:
            detach = ["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach"]
            result = await self.run([*detach, target, "--"], cwd=dest, timeout_s=timeout_s)
        return result

    async def narrate(self, text: str) -> None:
        """Write one of Orbital's own lines to the job log."""
        if self.log is not None:
            await self.log.line(f"==> [orbital] {text}")


@asynccontextmanager
async def open_workspace(
    job: Job,
    root: Path,
    sandbox_id: str,
    *,
    log: LogWriter | None = None,
    secrets: Sequence[str] = (),
    lease_grace_s: float | None = None,
) -> AsyncIterator[Workspace]:
    """Start a fresh workspace for ``job`` in ``root`` and remove it (processes,
    files) on exit.

    Args:
        root: the private directory; anything already there is removed first.
        sandbox_id: marks every process started here so a kill finds them all,
            including those that left the process group.
        log: the job log commands write to.
        secrets: values masked in text handed back (the log masks on its own).
        lease_grace_s: when set, commands run under the lease watchdog and are
            killed if the worker stops renewing the job's lease for this long.

    Raises:
        SandboxError: if the directory cannot be prepared or removed.
    """
    sandbox = LocalSandbox(root, sandbox_id, lease_grace_s)
    await sandbox.start(job)
    try:
        yield Workspace(sandbox, log, secrets)
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.destroy()
            logger.debug("workspace %s: removed %s", sandbox_id, root)
