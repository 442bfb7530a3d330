"""The agent job handler: an agent CLI session or a runbook, with limits.

::

    params ─> request ─> fix-ci/diagnose: failure streak < N? ─> passed, "skipped: ..."
                 │
                 ├─ runbook ─> papermill in a fresh workspace ─> exit status
                 └─ agent ───> fresh checkout of repo@branch ─> prompt ─> agent command

Either way the output goes to the job log (masked), the command's whole process
tree is killed at the timeout, the workspace (checkout included) is removed,
and the job ends with an ``agent.<action>`` event carrying ``success`` and a
``summary``. Agent jobs run on the worker's host, whatever sandbox its lab jobs
use: the agent needs its own credentials, and it is not a lab.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from orbital.agents.failures import FailureContext, read_failure_context
from orbital.agents.prompt import Prompt, build_prompt
from orbital.agents.request import AgentRequest, runbook_for
from orbital.agents.runbook import find_runbook, run_runbook
from orbital.agents.workspace import CommandResult, Workspace, open_workspace
from orbital.connection import resolve_redis_url, sync_client
from orbital.errors import InvalidIdentifierError, JobParamsError, OrbitalError
from orbital.logs import LogWriter
from orbital.pipeline import PipelineConfig, framework_version_from
from orbital.sandboxes.select import LEASE_GRACE_SHARE
from orbital.settings import Settings
from orbital.workers.runner import JobContext, JobHandler, JobResult

__all__ = ["CommentHook", "agent_argv", "make_agent_handler", "run_agent_job"]

logger = logging.getLogger(__name__)

#: Posts a comment: ``await hook(repo, number, body)`` (issue or pull request number).
CommentHook = Callable[[str, int, str], Awaitable[None]]

SUMMARY_CHARS = 1500
_COMMENT_CHARS = 60_000


def agent_argv(command: Sequence[str], prompt: str, prompt_file: Path) -> list[str]:
    """Return the agent command with ``{prompt}`` and ``{prompt_file}`` filled in
    (the prompt is appended when the command names neither).

    Each placeholder must be a whole element; the prompt always stays one argument.
    """
    argv: list[str] = []
    used = False
    for item in command:
        if item == "{prompt}":
            argv.append(prompt)
            used = True
        elif item == "{prompt_file}":
            argv.append(str(prompt_file))
            used = True
        else:
            argv.append(item)
    if not argv:
        raise JobParamsError(
            "setting agent_command is empty: name the agent CLI, e.g. claude -p {prompt}"
        )
    return argv if used else [*argv, prompt]


def make_agent_handler(comment: CommentHook | None = None) -> JobHandler:
    """Return the agent job handler; with ``comment``, the summary is also posted on
    the job's issue or pull request (a failure to post is logged, the job stands)."""

    async def handler(ctx: JobContext) -> JobResult:
        return await _AgentRun(ctx, comment).run()

    return handler


#: The handler for ``JobType.AGENT`` jobs (no GitHub comments).
run_agent_job: JobHandler = make_agent_handler()


class _AgentRun:
    """One agent job from params to result."""

    def __init__(self, ctx: JobContext, comment: CommentHook | None) -> None:
        self.ctx = ctx
        self.job = ctx.job
        self.settings: Settings = ctx.settings
        self.comment = comment
        self.secrets = [*self.settings.secret_values(), *self.settings.agent_environment().values()]
        self.started = time.monotonic()
        self.data: dict[str, Any] = {}
        self.fields: dict[str, object] = {}

    async def run(self) -> JobResult:
        log = self._open_log()
        await self.ctx.queue.update(
            self.job.id, self.ctx.token, {"log_path": str(log.archive_path)}
        )
        self.fields["log_path"] = str(log.archive_path)
        try:
            await log.line(f"==> [orbital] agent job {self.job.id} on worker {self.ctx.worker_id}")
            try:
                request = AgentRequest.from_job(self.job, runbook_for(self.settings.agent_runbooks))
            except (JobParamsError, InvalidIdentifierError) as err:
                await log.line(f"==> [orbital] refused: {err}")
                logger.error(
                    "worker %s: agent job %s refused: %s", self.ctx.worker_id, self.job.id, err
                )
                return JobResult.error(str(err))
            result = await self._act(request, log)
            await self._post_comment(request, result)
            return result
        finally:
            await self.ctx.close_log()

    def _open_log(self) -> LogWriter:
        # The context's log masks the configured secrets; the agent's credentials too.
        ctx = self.ctx
        if ctx.log is None:
            ctx.log = LogWriter(
                ctx.client,
                ctx.keys,
                self.job.id,
                self.secrets,
                self.settings.logs_dir / f"{self.job.id}.log",
                self.settings.log_max_entries,
            )
        return ctx.log

    async def _act(self, request: AgentRequest, log: LogWriter) -> JobResult:
        self.data.update(action=request.action, mode="runbook" if request.runbook else "agent")
        for thread in request.threads:
            if thread.number:
                key = "issue.number" if thread.kind == "issue" else "pull_request.number"
                self.data[key] = thread.number

        failure = None
        if request.needs_failures or request.build_job_id:
            failure = await anyio.to_thread.run_sync(self._read_failures, request)
            self.data.update(
                {"consecutive_failures": failure.consecutive_failures, "arch": failure.arch}
            )
        minimum = self.settings.diagnose_min_failures
        if (
            request.needs_failures
            and failure is not None
            and failure.consecutive_failures < minimum
        ):
            count = failure.consecutive_failures
            summary = (
                f"skipped: only {count} consecutive failure{'' if count == 1 else 's'} of "
                f"{failure.triple_text} (acts from {minimum})"
            )
            await log.line(f"==> [orbital] {summary}")
            return self._result(request, "passed", summary, skipped=True)

        try:
            if request.runbook:
                return await self._runbook(request, log)
            return await self._agent(request, failure, log)
        except JobParamsError as err:
            await log.line(f"==> [orbital] refused: {err}")
            return self._result(request, "error", str(err))

    def _read_failures(self, request: AgentRequest) -> FailureContext:
        client = sync_client(resolve_redis_url(self.settings))
        try:
            return read_failure_context(
                client,
                self.ctx.keys,
                request.repo,
                request.branch,
                request.arch,
                build_job_id=request.build_job_id,
                tail_bytes=self.settings.agent_log_tail_bytes,
            )
        finally:
            client.close()

    # the two modes ------------------------------------------------------------
    async def _agent(
        self, request: AgentRequest, failure: FailureContext | None, log: LogWriter
    ) -> JobResult:
        if failure is not None and failure.build is not None:
            request = dataclasses.replace(
                request,
                failed_step=request.failed_step or failure.build.failed_step,
                failure_summary=request.failure_summary or failure.build.failure_summary,
            )
            self.data["build.job_id"] = failure.build.job_id
        prompt = build_prompt(
            request,
            log_tail=failure.log_tail if failure else "",
            consecutive_failures=failure.consecutive_failures if failure else 0,
            arch=failure.arch if failure else "",
        )
        async with self._workspace(log) as ws:
            checkout = ws.checkouts / request.repo.split("/")[1]
            problem = await self._clone(ws, request, checkout)
            if problem:
                return self._result(request, "failed", problem)
            result = await self._run_agent(ws, prompt, request, checkout)
        return self._from_command(request, result, "agent")

    async def _runbook(self, request: AgentRequest, log: LogWriter) -> JobResult:
        settings, job = self.settings, self.job
        notebook = find_runbook(settings, request.runbook)
        output = settings.logs_dir / f"{job.id}.ipynb"
        parameters = dict(request.parameters)
        for key, value in (
            ("job_id", job.id),
            ("repository", request.repo),
            ("branch", request.branch),
            ("arch", request.arch),
            ("action", request.action),
        ):
            parameters.setdefault(key, value)
        env = {
            "ORBITAL_REDIS_URL": resolve_redis_url(settings),
            "ORBITAL_PREFIX": settings.prefix,
            "ORBITAL_HOME": str(settings.home),
            "ORBITAL_FLEET_FILE": settings.fleet_file,
        }
        self.data.update({"runbook": request.runbook, "runbook.output": str(output)})
        async with self._workspace(log) as ws:
            timeout_s = self._timeout_s()
            await ws.narrate(
                f"runbook {notebook.name}: papermill, timeout {timeout_s:.0f} s, output {output}"
            )
            result = await run_runbook(
                ws,
                notebook,
                output,
                parameters,
                timeout_s=timeout_s,
                kernel=settings.runbook_kernel,
                env=env,
            )
        return self._from_command(request, result, f"runbook {notebook.name}")

    # steps ------------------------------------------------------------------
    @asynccontextmanager
    async def _workspace(self, log: LogWriter) -> AsyncIterator[Workspace]:
        """A fresh workspace under the worker's work directory; while it is open the
        worker's lease renewals reach its sandbox (the lease watchdog)."""
        ctx = self.ctx
        root = self.settings.work_dir / ctx.worker_id / self.job.id
        grace = self.settings.lease_s * LEASE_GRACE_SHARE
        sandbox_id = f"{ctx.worker_id}.{self.job.id}"
        async with open_workspace(
            self.job, root, sandbox_id, log=log, secrets=self.secrets, lease_grace_s=grace
        ) as ws:
            ctx.sandbox, ctx.sandbox_info = ws.sandbox, ws.sandbox.describe()
            try:
                yield ws
            finally:
                ctx.sandbox = None

    async def _clone(self, ws: Workspace, request: AgentRequest, dest: Path) -> str:
        """Check out the job's repository; return what went wrong, or "" on success."""
        url = PipelineConfig(git_url_template=self.settings.git_url_template).git_url(request.repo)
        at = f" at {request.commit}" if request.commit else ""
        at += f" ({request.fetch_ref})" if request.fetch_ref else ""
        await ws.narrate(f"checkout {request.repo} branch {request.branch}{at}")
        result = await ws.clone(
            url,
            request.branch,
            dest,
            commit=request.commit,
            fetch_ref=request.fetch_ref,
            timeout_s=self._timeout_s(self.settings.step_timeout_s),
        )
        if not result.ok:
            what = f"checkout of {request.repo} branch {request.branch}{at}"
            return f"{what} failed: {result.describe()}\n{result.text(self.secrets, 600)}".strip()
        sha = await ws.run(
            ["git", "rev-parse", "HEAD"], cwd=dest, timeout_s=60, echo=False, capture=True
        )
        if sha.ok:
            self.fields["commit_sha"] = sha.output.decode(errors="replace").strip()
        version = await framework_version_from(ws.sandbox, str(dest))
        if version:
            self.fields["framework_version"] = version
        return ""

    async def _run_agent(
        self, ws: Workspace, prompt: Prompt, request: AgentRequest, checkout: Path
    ) -> CommandResult:
        prompt_file = ws.root / "prompt.txt"
        prompt_file.write_text(prompt.text)
        argv = agent_argv(self.settings.agent_command, prompt.text, prompt_file)
        timeout_s = self._timeout_s()
        await ws.narrate(
            f"agent {request.action}: {Path(argv[0]).name}, prompt {prompt.size_bytes} bytes with "
            f"{len(prompt.sections)} fenced section(s), timeout {timeout_s:.0f} s"
        )
        env = {
            "CI": "true",
            "ORBITAL_JOB_ID": self.job.id,
            "ORBITAL_ACTION": request.action,
            "ORBITAL_REPOSITORY": request.repo,
            "ORBITAL_BRANCH": request.branch,
            "ORBITAL_PROMPT_FILE": str(prompt_file),
            **self.settings.agent_environment(),
        }
        return await ws.run(argv, cwd=checkout, timeout_s=timeout_s, env=env)

    def _timeout_s(self, limit_s: float | None = None) -> float:
        """``limit_s`` (default: the agent timeout), kept inside the job's own deadline so
        that this handler, not the worker, ends the job (with its event) when time runs out."""
        left = self.ctx.cancel_scope.deadline - anyio.current_time()
        margin = min(30.0, left * 0.1)
        limit_s = self.settings.agent_timeout_s if limit_s is None else limit_s
        return max(1.0, min(limit_s, left - margin))

    # results ----------------------------------------------------------------
    def _from_command(self, request: AgentRequest, result: CommandResult, what: str) -> JobResult:
        self.data["exit_code"] = result.step.exit_code
        if result.ok:
            tail = result.text(self.secrets, SUMMARY_CHARS).strip()
            return self._result(request, "passed", tail or f"{what} finished without output")
        if result.step.timed_out:
            state = "timed_out"
        elif result.step.cancelled:
            state = "cancelled"
        else:
            state = "failed"
        head = f"{what} failed: {result.describe()}"
        tail = result.text(self.secrets, SUMMARY_CHARS - len(head) - 1).strip()
        return self._result(request, state, f"{head}\n{tail}".strip())

    def _result(
        self, request: AgentRequest, state: str, summary: str, *, skipped: bool = False
    ) -> JobResult:
        self.data.update(
            success=state == "passed",
            summary=summary[:SUMMARY_CHARS],
            skipped=skipped,
            duration_s=round(time.monotonic() - self.started, 3),
        )
        fields = {**self.fields, "summary": summary[:SUMMARY_CHARS]}
        if state != "passed":
            fields["error"] = summary[:2000]
        logger.info(
            "worker %s: agent job %s (%s) ends %s: %s",
            self.ctx.worker_id,
            self.job.id,
            request.action,
            state,
            summary.splitlines()[0] if summary else "",
        )
        event = {
            "type": f"agent.{request.action}",
            "data": {k: v for k, v in self.data.items() if v != ""},
        }
        return JobResult(state, fields=fields, events=[event])

    async def _post_comment(self, request: AgentRequest, result: JobResult) -> None:
        numbered = [t for t in request.threads if t.number]
        if self.comment is None or not numbered or self.data.get("skipped"):
            return
        thread = numbered[-1]
        verdict = "done" if result.state == "passed" else f"ended {result.state}"
        summary = self.data.get("summary", "")
        body = f"Orbital {request.action} ({verdict}, job `{self.job.id}`):\n\n{summary}"
        try:
            await self.comment(request.repo, thread.number, body[:_COMMENT_CHARS])
        except (OrbitalError, OSError, ValueError) as err:
            logger.warning(
                "worker %s: agent job %s: cannot comment on %s of %s (%s); the job result stands",
                self.ctx.worker_id,
                self.job.id,
                thread.label,
                request.repo,
                err,
            )
