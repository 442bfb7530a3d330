"""Running one claimed job: the context a handler gets and the lab handler.

A handler is ``async def handler(ctx: JobContext) -> JobResult``. The lab
handler runs the pipeline in a sandbox; agent and sync handlers are
registered by their own modules. When a job is interrupted (cancel, timeout)
the worker asks the context for a result built from what the handler had
recorded so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio

from orbital.builds import BuildRecord
from orbital.errors import SandboxError
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.logs import LogWriter
from orbital.pipeline import LabOutcome, PipelineConfig, run_lab
from orbital.queue import AsyncQueue
from orbital.results import Step, StepStatus
from orbital.sandboxes.base import Sandbox, SandboxProvider
from orbital.settings import Settings

__all__ = ["JobContext", "JobHandler", "JobResult", "run_lab_job"]

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a handler hands to the worker's finish step."""

    state: str
    build: dict[str, Any] | None = None
    fields: dict[str, object] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def error(cls, message: str) -> JobResult:
        return cls("error", fields={"error": message[:2000]})


@dataclass
class JobContext:
    """Everything a handler may use while it runs one job."""

    job: Job
    token: str
    worker_id: str
    settings: Settings
    queue: AsyncQueue
    client: redis.asyncio.Redis
    keys: Keys
    provider: SandboxProvider
    queue_wait_s: float
    cancel_scope: anyio.CancelScope
    outcome: LabOutcome = field(default_factory=LabOutcome)
    sandbox_info: dict[str, Any] = field(default_factory=dict)
    log: LogWriter | None = None
    sandbox: Sandbox | None = None
    started_monotonic: float = field(default_factory=time.monotonic)

    def open_log(self) -> LogWriter:
        """Open the job's masked live log (once) and return it."""
        if self.log is None:
            path = self.settings.logs_dir / f"{self.job.id}.log"
            self.log = LogWriter(
                self.client,
                self.keys,
                self.job.id,
                self.settings.secret_values(),
                path,
                self.settings.log_max_entries,
            )
        return self.log

    async def close_log(self) -> None:
        if self.log is not None:
            with anyio.CancelScope(shield=True):
                await self.log.close(self.settings.log_ttl_s)

    def interrupted(self, reason: str) -> JobResult:
        """The result of a job stopped from outside: ``cancelled`` or ``timed_out``."""
        state = "cancelled" if reason == "cancelled" else "timed_out"
        elapsed = time.monotonic() - self.started_monotonic
        if state == "timed_out":
            message = f"job timed out after {elapsed:.0f} s (limit {self.job.timeout_s:g} s); its processes were killed"
        else:
            message = "job cancelled; its processes were killed"
        self.outcome.steps.append(
            Step(
                name="job",
                status=StepStatus(state),
                duration_s=round(elapsed, 3),
                error=message,
                source="pipeline",
            )
        )
        self.outcome.status = state
        if self.job.type.is_lab:
            return lab_result(self, state)
        return JobResult(state, fields={"error": message})


JobHandler = Callable[[JobContext], Awaitable[JobResult]]


def lab_result(ctx: JobContext, status: str) -> JobResult:
    """Build the record and events of a lab job from the context's outcome."""
    job, outcome = ctx.job, ctx.outcome
    now = time.time()
    record = BuildRecord(
        job_id=job.id,
        type=job.type.value,
        repo=job.repo,
        branch=job.branch,
        arch=job.arch,
        status=status,
        trigger=job.trigger,
        commit=job.commit,
        commit_sha=outcome.commit_sha,
        framework_version=outcome.framework_version,
        nightly_id=job.nightly_id,
        worker=ctx.worker_id,
        attempts=job.attempts,
        steps=outcome.steps,
        failed_step=outcome.failed_step,
        failure_summary=outcome.failure_summary,
        problems=outcome.problems,
        queued_at=job.enqueued_at,
        started_at=job.started_at,
        finished_at=now,
        queue_wait_s=round(ctx.queue_wait_s, 3),
        setup_s=outcome.setup_s,
        run_s=outcome.run_s,
        log_path=str(ctx.log.archive_path) if ctx.log else "",
        sandbox=ctx.sandbox_info,
    )
    events = [_completed_event(record)]
    failed = [
        s
        for s in record.steps
        if s.status in (StepStatus.FAILED, StepStatus.ERROR, StepStatus.TIMED_OUT)
    ]
    for index, step in enumerate(failed):
        events.append(
            {
                "type": "build.assertion.failed",
                "suffix": f".{index}",
                "data": {
                    "step": step.name,
                    "description": step.description,
                    "error": step.error[:1000],
                    "status": step.status.value,
                    "duration_s": step.duration_s,
                    "source": step.source,
                },
            }
        )
    fields: dict[str, object] = {
        "commit_sha": outcome.commit_sha,
        "framework_version": outcome.framework_version,
        "log_path": record.log_path,
    }
    if status != "passed":
        fields["error"] = record.failure_summary
    return JobResult(status, build=record.to_dict(), fields=fields, events=events)


def _completed_event(record: BuildRecord) -> dict[str, Any]:
    return {
        "type": "build.completed",
        "data": {
            "status": record.status,
            "passed": record.status == "passed",
            "duration_s": round(record.duration_s, 3),
            "failed_step": record.failed_step,
            "failure_summary": record.failure_summary,
            "isolation": record.sandbox.get("isolation", ""),
            "sandbox": record.sandbox.get("kind", ""),
            "queue_wait_s": record.queue_wait_s,
            "setup_s": record.setup_s,
            "run_s": record.run_s,
            "steps": len(record.steps),
        },
    }


async def run_lab_job(ctx: JobContext) -> JobResult:
    """Handler for integration-test, unit-test and daemon jobs."""
    job, settings = ctx.job, ctx.settings
    log = ctx.open_log()
    await ctx.queue.update(job.id, ctx.token, {"log_path": str(log.archive_path)})
    config = PipelineConfig(
        git_url_template=str(job.params.get("git_url_template") or settings.git_url_template),
        step_timeout_s=float(job.params.get("step_timeout_s") or settings.step_timeout_s),
        secrets=tuple(settings.secret_values()),
    )

    async def on_meta(fields: Mapping[str, str]) -> None:
        await ctx.queue.update(job.id, ctx.token, fields)

    try:
        await log.line(
            f"==> [orbital] job {job.id} ({job.type}) on worker {ctx.worker_id}, attempt {job.attempts}"
        )
        async with ctx.provider.acquire(job) as sandbox:
            ctx.sandbox_info = sandbox.describe()
            ctx.sandbox = sandbox
            await run_lab(job, sandbox, log, config, on_meta, outcome=ctx.outcome)
            if job.type == JobType.DAEMON and ctx.outcome.status == "passed":
                await log.line(
                    "==> [orbital] daemon is up; the sandbox stays until the job is cancelled"
                )
                await log.flush()
                await anyio.sleep_forever()
    except SandboxError as err:
        logger.error("worker %s: job %s: sandbox failed: %s", ctx.worker_id, job.id, err)
        ctx.outcome.steps.append(
            Step(name="sandbox", status=StepStatus.ERROR, error=str(err)[:2000], source="pipeline")
        )
        return lab_result(ctx, "error")
    finally:
        await ctx.close_log()
    return lab_result(ctx, ctx.outcome.status)
