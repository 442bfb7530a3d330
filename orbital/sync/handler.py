"""The sync job handler: ``drift`` over the fleet, or ``validate`` one repository.

``params.action``:

* ``drift`` (the default; the scheduler queues one every hour): every registry
  repository that is not archived (or those in ``params.repos``). Ends
  ``passed`` when the check ran, ``failed`` when the target version could not
  be determined. Drift itself is data, not a failure.
* ``validate`` (a push to a default branch): the job's own repository and
  branch. Ends ``passed`` when it declares the target version, ``failed``
  otherwise (behind, ahead, or unknown with the reason).

Results and ``sync.drift`` events are written in one transaction
(:func:`orbital.sync.store.save_report`) before the job ends.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from orbital.agents.workspace import open_workspace
from orbital.errors import FleetError, JobParamsError
from orbital.fleet import load_fleet
from orbital.jobs import Job
from orbital.settings import Settings
from orbital.sync.drift import UP_TO_DATE, DriftReport, RepoRef, check_drift, fleet_refs
from orbital.sync.store import drift_events, save_report
from orbital.workers.runner import JobContext, JobResult

__all__ = ["SYNC_ACTIONS", "repos_to_check", "run_sync_job"]

logger = logging.getLogger(__name__)

SYNC_ACTIONS = ("drift", "validate")


def repos_to_check(settings: Settings, job: Job) -> tuple[list[RepoRef], bool]:
    """Return the repositories a sync job checks, and whether they are the whole fleet.

    Raises:
        JobParamsError: for an unknown action, a validate job without a repository,
            or a drift job when no registry is configured.
        FleetError: if the registry cannot be loaded.
    """
    action = str(job.params.get("action") or "drift")
    if action not in SYNC_ACTIONS:
        raise JobParamsError(
            f"job {job.id}: params.action {action!r} is not a sync action; expected drift or validate"
        )
    if action == "validate":
        if not job.repo:
            raise JobParamsError(f"job {job.id}: a validate job needs a repository (owner/name)")
        name = ""
        if settings.fleet_file:
            entry = load_fleet(settings.fleet_file).by_repo(job.repo)
            name = entry.name if entry else ""
        return [RepoRef(job.repo, job.branch, name)], False

    if not settings.fleet_file:
        raise JobParamsError(
            f"job {job.id}: no registry to check: set fleet_file (ORBITAL_FLEET_FILE)"
        )
    only = job.params.get("repos")
    if only is not None and not (isinstance(only, list) and all(isinstance(r, str) for r in only)):
        raise JobParamsError(f"job {job.id}: params.repos must be a list of repository names")
    return fleet_refs(load_fleet(settings.fleet_file), only), only is None


async def run_sync_job(ctx: JobContext) -> JobResult:
    """Handler for ``JobType.SYNC`` jobs."""
    job, settings = ctx.job, ctx.settings
    log = ctx.open_log()
    await ctx.queue.update(job.id, ctx.token, {"log_path": str(log.archive_path)})
    try:
        await log.line(f"==> [orbital] sync job {job.id} on worker {ctx.worker_id}")
        try:
            refs, whole_fleet = await anyio.to_thread.run_sync(repos_to_check, settings, job)
        except (JobParamsError, FleetError) as err:
            await log.line(f"==> [orbital] refused: {err}")
            logger.error("worker %s: sync job %s refused: %s", ctx.worker_id, job.id, err)
            return JobResult.error(str(err))

        # No lease watchdog here: the git commands only read, so a second copy of this
        # job after a lost lease does no harm, and each watched command costs a process.
        root = settings.work_dir / ctx.worker_id / job.id
        sandbox_id = f"{ctx.worker_id}.{job.id}"
        async with open_workspace(
            job, root, sandbox_id, log=log, secrets=settings.secret_values()
        ) as ws:
            report = await check_drift(settings, ws, refs, checked_by=job.id)

        events = drift_events(settings.prefix, report, job=job)
        await save_report(ctx.client, ctx.keys, report, events, replace=whole_fleet)
        await log.line(f"==> [orbital] {report.summary()}")
        for result in report.results:
            detail = f" ({result.reason})" if result.reason else ""
            await log.line(
                f"    {result.repo:<60} {result.status:<10} {result.current or '-'}{detail}"
            )
        return _result(job, report)
    finally:
        await ctx.close_log()


def _result(job: Job, report: DriftReport) -> JobResult:
    fields: dict[str, Any] = {"summary": report.summary()}
    if not report.target.version:
        fields["error"] = f"target version unknown: {report.target.reason}"
        return JobResult("failed", fields=fields)
    if job.params.get("action") == "validate":
        [result] = report.results
        if result.status != UP_TO_DATE:
            why = result.reason or f"declares {result.current}, target is {result.target}"
            fields["error"] = f"{result.repo} {result.branch} is {result.status}: {why}"
            return JobResult("failed", fields=fields)
        if result.current:
            fields["framework_version"] = result.current
    return JobResult("passed", fields=fields)
