"""``orbital sync``: framework-version drift from the command line.

::

    orbital sync status [--json]                 the stored results, one row per repository
    orbital sync run [--repo R] [--no-wait]      queue a drift (or validate) job and wait for it
    orbital sync run --here                      check now in this process, no worker needed

Wired into the ``orbital`` group with ``main.add_command(sync)``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import click

from orbital.agents.workspace import open_workspace
from orbital.connection import async_client, resolve_redis_url, sync_client
from orbital.console import render_table
from orbital.errors import OrbitalError
from orbital.ids import new_job_id, validate_repo
from orbital.jobs import TERMINAL_STATES, Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from orbital.sync.drift import DriftReport, DriftResult, check_drift
from orbital.sync.handler import repos_to_check
from orbital.sync.store import DriftStore, drift_events, save_report

__all__ = ["sync"]


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "-"


def results_table(results: Sequence[DriftResult]) -> str:
    """The drift results as a text table."""
    rows = [
        (
            r.repo,
            r.branch,
            r.status,
            r.current or "-",
            r.target or "-",
            _utc(r.checked_at),
            r.reason[:70],
        )
        for r in results
    ]
    return render_table(
        rows, ["repository", "branch", "status", "current", "target", "checked (UTC)", "reason"]
    )


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrbitalError as err:
            click.echo(f"orbital sync: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def sync() -> None:
    """Framework-version drift across the fleet."""


@sync.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def status(as_json: bool) -> None:
    """Show each repository's framework version against the target."""
    settings = Settings.from_env()
    client = sync_client(resolve_redis_url(settings))
    try:
        store = DriftStore(client, Keys(settings.prefix))
        results, last = store.results(), store.last_check()
    finally:
        client.close()
    if as_json:
        payload = {"last_check": last, "results": [r.to_dict() for r in results]}
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    if not results:
        click.echo("no drift check has run yet: orbital sync run")
        return
    click.echo(results_table(results))
    if last:
        click.echo(
            f"\nlast fleet check {_utc(last['checked_at'])} UTC by {last['checked_by']}: {last['summary']}"
        )


@sync.command()
@click.option(
    "--repo", default="", help="Validate this repository (owner/name) instead of the fleet."
)
@click.option("--branch", default="main", show_default=True, help="Branch of --repo.")
@click.option("--here", is_flag=True, help="Check in this process instead of queueing a job.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the queued job.")
@click.option(
    "--timeout", "timeout_s", type=float, default=900.0, show_default=True, help="Seconds to wait."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def run(repo: str, branch: str, here: bool, wait: bool, timeout_s: float, as_json: bool) -> None:
    """Check framework-version drift now.

    Queues a sync job for a manager worker (orbital worker --manager) and waits for
    it; --here runs the check in this process instead.
    """
    settings = Settings.from_env()
    job = Job(
        type=JobType.SYNC, repo=validate_repo(repo) if repo else "", branch=branch if repo else "main",
        params={"action": "validate" if repo else "drift"}, trigger="cli", id=new_job_id("s"),
        timeout_s=settings.job_timeout_s, max_attempts=settings.max_attempts,
    )  # fmt: skip
    job.validate()
    if here:
        report = anyio.run(_check_here, settings, job)
        _print(list(report.results), report.summary(), as_json)
        return
    _queue_and_wait(settings, job, wait, timeout_s, as_json)


def _queue_and_wait(
    settings: Settings, job: Job, wait: bool, timeout_s: float, as_json: bool
) -> None:
    client = sync_client(resolve_redis_url(settings))
    try:
        queue = Queue(client, settings)
        queue.enqueue(job)
        if not wait:
            click.echo(json.dumps({"job_id": job.id}) if as_json else f"{job.id}: queued")
            return
        deadline = time.monotonic() + timeout_s
        stored = queue.get_job(job.id)
        while stored.state not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                click.echo(
                    f"{job.id}: still {stored.state} after {timeout_s:g} s; is a manager worker "
                    "serving the sync queue (orbital worker --manager)?",
                    err=True,
                )
                sys.exit(1)
            time.sleep(0.5)
            stored = queue.get_job(job.id)
        store = DriftStore(client, Keys(settings.prefix))
        results = store.results()
        if job.repo:
            results = [r for r in results if r.repo == job.repo]
        summary = f"{job.id} {stored.state}: {stored.error or 'done'}"
        _print(results, summary, as_json)
        if stored.state != "passed":
            sys.exit(1)
    finally:
        client.close()


async def _check_here(settings: Settings, job: Job) -> DriftReport:
    refs, whole_fleet = repos_to_check(settings, job)
    client = async_client(resolve_redis_url(settings))
    root = settings.work_dir / "sync-cli" / job.id
    try:
        async with open_workspace(
            job, root, f"sync-cli.{job.id}", secrets=settings.secret_values()
        ) as ws:
            report = await check_drift(settings, ws, refs, checked_by=job.id)
        await save_report(client, Keys(settings.prefix), report, drift_events(settings.prefix, report),
                          replace=whole_fleet)  # fmt: skip
    finally:
        await client.aclose()
    return report


def _print(results: list[DriftResult], summary: str, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps({"summary": summary, "results": [r.to_dict() for r in results]}, indent=2)
        )
        return
    if results:
        click.echo(results_table(results))
        click.echo("")
    click.echo(summary)
