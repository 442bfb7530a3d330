"""The ``orbital`` command.

Every command reads the same settings (``ORBITAL_*`` variables, or the file in
``ORBITAL_CONFIG``); commands that print data accept ``--json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import click
import redis

from orbital.client import Orbital, connect
from orbital.console import configure_logging, render_table
from orbital.errors import LogError, OrbitalError, UnknownJobError
from orbital.jobs import JobType
from orbital.settings import Settings, host_arch

__all__ = ["main"]


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


class _Ctx:
    def __init__(self) -> None:
        self._orbital: Orbital | None = None

    @property
    def orbital(self) -> Orbital:
        if self._orbital is None:
            self._orbital = connect()
        return self._orbital


pass_ctx = click.make_pass_decorator(_Ctx, ensure=True)


#: Exit statuses: 0 done, 1 not found (unknown job or log), 2 refused input or
#: configuration, 3 Redis unreachable.
EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_NO_REDIS = 1, 2, 3


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UnknownJobError, LogError) as err:
            click.echo(f"orbital: {err}", err=True)
            sys.exit(EXIT_NOT_FOUND)
        except OrbitalError as err:
            click.echo(f"orbital: {err}", err=True)
            sys.exit(EXIT_REFUSED)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            click.echo(
                f"orbital: cannot reach Redis ({err}); is it running, and is ORBITAL_REDIS_URL right?",
                err=True,
            )
            sys.exit(EXIT_NO_REDIS)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Orbital keeps a fleet of lab repositories healthy: it runs each lab's set-up
    and tests in a sandbox, nightly and on demand, and records every step."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level)


# ---------------------------------------------------------------- demo
@main.command()
@click.option(
    "--sandbox",
    type=click.Choice(["auto", "local", "docker"]),
    default="auto",
    show_default=True,
    help="auto uses Docker when an engine answers, else the local sandbox.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(sandbox: str, as_json: bool) -> None:
    """Run one nightly of a small sample fleet on this machine and show the results.

    Needs no configuration: Redis is embedded, the sample labs are local git
    repositories created under ~/.orbital/demo, and a worker runs in-process.
    """
    from orbital.demo import run_demo
    from orbital.sandboxes.select import choose_provider

    settings = Settings.from_env()
    factory, reason = choose_provider(settings, sandbox)

    def say(message: str) -> None:
        if not as_json:
            click.echo(message)

    say(f"sandbox: {reason}")
    result = run_demo(settings, factory, progress=say)
    orbital = Orbital(result.settings, result.client)
    builds = [b for b in orbital.history.recent(100) if b.nightly_id == result.run.run_id]
    triage = orbital.triage()
    if as_json:
        _emit_json(
            {
                "nightly": result.run.to_dict(),
                "sandbox": result.sandbox,
                "builds": [b.to_dict() for b in builds],
                "triage": [
                    {
                        "repo": t.repo,
                        "branch": t.branch,
                        "arch": t.arch,
                        "consecutive_failures": t.consecutive_failures,
                    }
                    for t in triage
                ],
            }
        )
        return
    click.echo("")
    click.echo(_builds_table(builds))
    click.echo("")
    run = result.run
    rate = f"{run.pass_rate:.0%}" if run.pass_rate is not None else "-"
    click.echo(
        f"nightly {run.run_id}: {run.passed} passed, {run.failed} failed of {run.total} "
        f"(pass rate {rate}) in {run.finished_at - run.started_at:.1f} s"
    )
    click.echo("")
    click.echo("triage queue (worst first):")
    click.echo(_triage_table(triage) if triage else "  (empty)")
    click.echo("")
    click.echo(f"logs: orbital logs <job id>   (with ORBITAL_PREFIX={result.settings.prefix})")


def _builds_table(builds: Iterable[Any]) -> str:
    rows = [
        (
            b.job_id,
            b.repo,
            b.branch,
            b.arch,
            b.status,
            f"{b.duration_s:.1f}s",
            len(b.steps),
            (b.failed_step or "")[:48],
        )
        for b in builds
    ]
    return render_table(
        rows, ["job", "repo", "branch", "arch", "status", "time", "steps", "failed step"]
    )


def _triage_table(entries: Iterable[Any]) -> str:
    rows = [
        (
            t.consecutive_failures,
            t.repo,
            t.branch,
            t.arch,
            (
                t.last_build.failure_summary.splitlines()[0][:60]
                if t.last_build and t.last_build.failure_summary
                else ""
            ),
        )
        for t in entries
    ]
    return render_table(rows, ["fails", "repo", "branch", "arch", "last failure"])


# ---------------------------------------------------------------- worker
@main.command()
@click.option(
    "--arch",
    default=host_arch,
    show_default="this machine's",
    help="Arch whose test queue to serve.",
)
@click.option(
    "--capacity",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="Lab jobs at once.",
)
@click.option("--manager", is_flag=True, help="Also serve the agent and sync queues.")
@click.option("--agent-capacity", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--sync-capacity", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option(
    "--sandbox",
    type=click.Choice(["local", "docker"]),
    default=None,
    help="Where lab steps run (default: ORBITAL_SANDBOX, else local).",
)
@click.option(
    "--name", default="", help="Stable worker id; a restart under it recovers its jobs at once."
)
@click.option(
    "--queue", "queues", multiple=True, help="Serve these queues instead (name or name=capacity)."
)
@click.option(
    "--drain-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="On SIGTERM, seconds running jobs get before they go back to their queue.",
)
def worker(
    arch: str,
    capacity: int,
    manager: bool,
    agent_capacity: int,
    sync_capacity: int,
    sandbox: str | None,
    name: str,
    queues: tuple[str, ...],
    drain_timeout: float,
) -> None:
    """Run a worker against the configured Redis until SIGTERM (then drain)."""
    from orbital.workers.service import queue_plan, serve

    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    settings = Settings.from_env(sandbox=sandbox) if sandbox else Settings.from_env()
    plan = queue_plan(
        arch=arch, capacity=capacity, manager=manager, agent_capacity=agent_capacity,
        sync_capacity=sync_capacity, queues=queues,
    )  # fmt: skip
    sys.exit(serve(settings, plan, arch=arch, name=name, drain_timeout_s=drain_timeout))


# ---------------------------------------------------------------- jobs
@main.command()
@click.argument("repo")
@click.option("--branch", default="main", show_default=True)
@click.option(
    "--arch",
    multiple=True,
    help="Arch (repeatable); default: the registry's archs, else this machine's.",
)
@click.option(
    "--type",
    "job_type",
    type=click.Choice([t.value for t in JobType]),
    default="integration-test",
    show_default=True,
)
@click.option("--commit", default="", help="Commit sha to test (default: the branch head).")
@click.option("--id", "job_id", default="", help="Use this job id (kept as given).")
@click.option(
    "--delay",
    type=click.FloatRange(0, 30 * 86400),
    default=0.0,
    help="Seconds before the job may start (at most 30 days).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def enqueue(
    ctx: _Ctx,
    repo: str,
    branch: str,
    arch: tuple[str, ...],
    job_type: str,
    commit: str,
    job_id: str,
    delay: float,
    as_json: bool,
) -> None:
    """Queue a job for REPO (owner/name)."""
    o = ctx.orbital
    arches = list(arch)
    if not arches and JobType(job_type).is_lab:
        entry = o.fleet().by_repo(repo) if o.settings.fleet_file else None
        arches = list(entry.arches) if entry else [host_arch()]
    results = []
    for index, one in enumerate(arches or [""]):
        given_id = job_id if index == 0 or not job_id else f"{job_id}-{index}"
        results.append(
            o.enqueue(
                repo,
                branch=branch,
                arch=one or None,
                job_type=job_type,
                commit=commit,
                job_id=given_id,
                delay_s=delay,
                trigger="cli",
            )
        )
    if as_json:
        _emit_json([r.__dict__ for r in results])
        return
    for r in results:
        extra = f" behind {r.holder}" if r.holder else f" ({r.state})" if r.state else ""
        click.echo(f"{r.job_id}: {r.outcome}{extra}")


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--reason", default="cancelled by an operator", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def cancel(ctx: _Ctx, job_ids: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Cancel jobs (waiting ones end at once; running ones are killed)."""
    results = [ctx.orbital.cancel(j, reason) for j in job_ids]
    if as_json:
        _emit_json([r.__dict__ for r in results])
        return
    for r in results:
        click.echo(f"{r.job_id!r}: {r.outcome} (was {r.previous or 'unknown'})")
    if any(r.outcome == "unknown" for r in results):
        sys.exit(EXIT_NOT_FOUND)


@main.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@pass_ctx
def logs(ctx: _Ctx, job_id: str, follow: bool) -> None:
    """Print a job's (masked) log."""
    if follow:
        for chunk in ctx.orbital.follow(job_id):
            click.echo(chunk, nl=False)
        return
    click.echo(ctx.orbital.logs(job_id), nl=False)


@main.command()
@click.argument("job_id")
@pass_ctx
def show(ctx: _Ctx, job_id: str) -> None:
    """Print one job and its build record as JSON."""
    o = ctx.orbital
    build = o.build(job_id)
    _emit_json({"job": o.job(job_id).public_dict(), "build": build.to_dict() if build else None})


# ---------------------------------------------------------------- views
@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status(ctx: _Ctx, as_json: bool) -> None:
    """Queue depths, running jobs and live workers."""
    data = ctx.orbital.status()
    if as_json:
        _emit_json(data)
        return
    click.echo(
        render_table(sorted(data["queues"].items()), ["queue", "waiting"])
        if data["queues"]
        else "no queues yet"
    )
    click.echo("")
    waiting = data["waiting"]
    click.echo(f"deferred: {waiting['deferred']}   scheduled: {waiting['scheduled']}")
    click.echo("")
    running = [
        (j["id"], j["repo"], j["branch"], j["arch"], j["worker"], _ago(j["started_at"]))
        for j in data["running"]
    ]
    click.echo(
        render_table(running, ["running job", "repo", "branch", "arch", "worker", "started (UTC)"])
        if running
        else "no running jobs"
    )
    click.echo("")
    workers = [
        (
            w["id"],
            w["arch"],
            w["status"],
            w["queues"],
            f"{w['active']}/{w['capacity_total']}",
            json.loads(w.get("sandbox") or "{}").get("kind", ""),
            _ago(float(w["last_heartbeat"])),
        )
        for w in data["workers"]
    ]
    click.echo(
        render_table(
            workers, ["worker", "arch", "status", "queues", "busy", "sandbox", "heartbeat (UTC)"]
        )
        if workers
        else "no live workers"
    )


@main.command()
@click.option("--repo", default=None, help="Only this repository (owner/name).")
@click.option("-n", "--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--triage", "show_triage", is_flag=True, help="Show the triage queue instead.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def history(ctx: _Ctx, repo: str | None, limit: int, show_triage: bool, as_json: bool) -> None:
    """Recent builds, newest first (or the triage queue)."""
    o = ctx.orbital
    if show_triage:
        entries = o.triage(limit)
        if as_json:
            _emit_json(
                [
                    {
                        "repo": t.repo,
                        "branch": t.branch,
                        "arch": t.arch,
                        "consecutive_failures": t.consecutive_failures,
                        "last_job": t.last_build.job_id if t.last_build else None,
                    }
                    for t in entries
                ]
            )
        else:
            click.echo(_triage_table(entries) if entries else "triage queue is empty")
        return
    builds = o.history.for_repo(repo, limit) if repo else o.history.recent(limit)
    if as_json:
        _emit_json([b.to_dict() for b in builds])
        return
    click.echo(_builds_table(builds) if builds else "no builds yet")


@main.command()
@click.option(
    "--file",
    "fleet_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Registry to read (default: ORBITAL_FLEET_FILE).",
)
@click.option("--json", "as_json", is_flag=True)
def fleet(fleet_file: str | None, as_json: bool) -> None:
    """Show the fleet registry and the nightly fan-out."""
    from orbital.fleet import load_fleet

    path = fleet_file or Settings.from_env().fleet_file
    if not path:
        raise click.UsageError("no registry: pass --file or set ORBITAL_FLEET_FILE")
    registry = load_fleet(path)
    fanout = registry.nightly_fanout()
    if as_json:
        _emit_json(
            {
                "path": str(path),
                "entries": [e.to_dict() for e in registry.entries],
                "eligible": [e.name for e in registry.eligible()],
                "nightly": [{"repo": e.repo, "branch": e.branch, "arch": a} for e, a in fanout],
            }
        )
        return
    rows = [
        (
            e.name,
            e.repo,
            e.status,
            "yes" if e.ci else "no",
            ",".join(e.arches),
            "yes" if e.nightly_eligible else "-",
        )
        for e in registry.entries
    ]
    click.echo(render_table(rows, ["name", "repo", "status", "ci", "arch", "nightly"]))
    both = sum(1 for e in registry.eligible() if len(e.arches) == 2)
    click.echo(
        f"\n{len(registry.entries)} entries, {len(registry.eligible())} eligible, "
        f"{len(fanout)} nightly jobs ({both} on both archs)"
    )


@main.command()
@click.option(
    "--stagger", type=float, default=None, help="Seconds between enqueues per arch queue."
)
@click.option(
    "--wait", is_flag=True, help="Wait until every job of the run ended and print totals."
)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def nightly(ctx: _Ctx, stagger: float | None, wait: bool, as_json: bool) -> None:
    """Plan a nightly run of the configured fleet now."""
    o = ctx.orbital
    run = o.nightly(stagger_s=stagger)
    if not as_json:
        click.echo(f"nightly {run.run_id}: {run.total} jobs planned")
    while wait and not run.finished:
        time.sleep(2)
        newer = o.nightly_run(run.run_id)
        if newer.ended != run.ended and not as_json:
            click.echo(
                f"  {newer.ended}/{newer.total} ended ({newer.passed} passed, {newer.failed} failed)"
            )
        run = newer
    if as_json:
        _emit_json(run.to_dict())
    elif run.finished:
        click.echo(f"nightly {run.run_id} finished: {run.passed} passed, {run.failed} failed")


def _add_subcommands() -> None:
    from orbital.sync.cli import sync

    main.add_command(sync)


_add_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
