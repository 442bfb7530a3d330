"""The library facade for scripts, notebooks and the CLI.

::

    import orbital
    o = orbital.connect()                 # embedded Redis when no URL is configured
    o.enqueue("owner/lab", branch="main", arch="amd64")
    o.builds_frame(repo="owner/lab")
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pandas as pd
import redis

from orbital import analysis
from orbital.builds import BuildHistory, BuildRecord, TriageEntry
from orbital.connection import resolve_redis_url, sync_client
from orbital.errors import ConfigError
from orbital.fleet import Fleet, load_fleet
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.logs import follow_log, read_log
from orbital.queue import CancelResult, EnqueueResult, Queue
from orbital.scheduler import NightlyRun, Scheduler, plan_nightly
from orbital.settings import Settings, host_arch

__all__ = ["Orbital", "connect"]


class Orbital:
    """One connection to an Orbital installation (its Redis and settings)."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.prefix)
        self.queue = Queue(client, settings)
        self.history = BuildHistory(client, self.keys)
        self.scheduler = Scheduler(client, settings, self.queue)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Orbital:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # fleet --------------------------------------------------------------
    def fleet(self) -> Fleet:
        """Load the configured fleet registry.

        Raises:
            ConfigError: if no fleet file is configured.
            FleetError: if it is invalid.
        """
        if not self.settings.fleet_file:
            raise ConfigError(
                "no fleet registry configured: set ORBITAL_FLEET_FILE to a repos.yaml"
            )
        return load_fleet(self.settings.fleet_file)

    # jobs ---------------------------------------------------------------
    def enqueue(
        self,
        repo: str,
        *,
        branch: str = "main",
        arch: str | None = None,
        job_type: JobType | str = JobType.INTEGRATION_TEST,
        commit: str = "",
        trigger: str = "manual",
        params: dict[str, Any] | None = None,
        job_id: str = "",
        timeout_s: float | None = None,
        delay_s: float = 0.0,
    ) -> EnqueueResult:
        """Queue one job; lab jobs default to this machine's arch.

        Raises:
            InvalidIdentifierError: if repo, branch, commit, arch or job_id is refused.
        """
        kind = JobType(job_type)
        job = Job(
            type=kind,
            repo=repo,
            branch=branch,
            commit=commit,
            arch=(arch or host_arch()) if kind.is_lab else (arch or ""),
            trigger=trigger,
            params=dict(params or {}),
            id=job_id,
            timeout_s=timeout_s or self.settings.job_timeout_s,
            max_attempts=self.settings.max_attempts,
        )
        due = time.time() + delay_s if delay_s > 0 else 0.0
        return self.queue.enqueue(job, due_at=due)

    def cancel(self, job_id: str, reason: str = "cancelled by an operator") -> CancelResult:
        return self.queue.cancel(job_id, reason)

    def job(self, job_id: str) -> Job:
        return self.queue.get_job(job_id)

    def build(self, job_id: str) -> BuildRecord | None:
        return self.history.get(job_id)

    def logs(self, job_id: str) -> str:
        """The job's whole (masked) log so far."""
        return read_log(self.client, self.keys, job_id).decode(errors="replace")

    def follow(self, job_id: str, timeout_s: float | None = None) -> Iterator[str]:
        """Yield the job's log live until the job ends."""
        for chunk in follow_log(self.client, self.keys, job_id, timeout_s=timeout_s):
            yield chunk.decode(errors="replace")

    # nightly ------------------------------------------------------------
    def nightly(self, *, stagger_s: float | None = None, fleet: Fleet | None = None) -> NightlyRun:
        """Plan a nightly run now (outside the cron schedule)."""
        plan = plan_nightly(
            fleet or self.fleet(),
            start_at=time.time(),
            stagger_s=self.settings.nightly_stagger_s if stagger_s is None else stagger_s,
            job_timeout_s=self.settings.job_timeout_s,
            max_attempts=self.settings.max_attempts,
        )
        return self.scheduler.submit(plan)

    def nightly_run(self, run_id: str) -> NightlyRun:
        return self.scheduler.get(run_id)

    # status -------------------------------------------------------------
    def workers(self) -> list[dict[str, str]]:
        """Registrations of live workers."""
        ids = sorted(w.decode() for w in cast(set[bytes], self.client.smembers(self.keys.workers)))
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
        rows = []
        for data in pipe.execute():
            if data:
                rows.append({k.decode(): v.decode() for k, v in data.items()})
        return rows

    def status(self) -> dict[str, Any]:
        """Queue depths, running and waiting jobs, and live workers."""
        active = self.queue.active_jobs()
        return {
            "queues": self.queue.depths(),
            "running": [j.public_dict() for j in active if j.state == "running"],
            "waiting": {
                s: sum(1 for j in active if j.state == s)
                for s in ("queued", "deferred", "scheduled")
            },
            "workers": self.workers(),
        }

    def triage(self, limit: int = 50) -> list[TriageEntry]:
        return self.history.triage(limit)

    # frames ---------------------------------------------------------------
    def builds_frame(self, *, repo: str | None = None, limit: int = 500) -> pd.DataFrame:
        records = self.history.for_repo(repo, limit) if repo else self.history.recent(limit)
        return analysis.builds_frame(records)

    def jobs_frame(self, *, limit: int = 500) -> pd.DataFrame:
        return analysis.jobs_frame(self.queue.active_jobs(limit) + self.queue.ended_jobs(limit))

    def workers_frame(self) -> pd.DataFrame:
        return analysis.workers_frame(self.workers())


def connect(redis_url: str | None = None, **overrides: Any) -> Orbital:
    """Connect to Orbital: the configured Redis, or the embedded one.

    Args:
        redis_url: overrides ``ORBITAL_REDIS_URL``.
        overrides: any other :class:`~orbital.settings.Settings` field.
    """
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings.from_env(**overrides)
    return Orbital(settings, sync_client(resolve_redis_url(settings)))
