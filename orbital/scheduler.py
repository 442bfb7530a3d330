"""Nightly runs: the plan from the fleet, staggered delayed jobs, the run record.

A nightly plan is stored in Redis in one transaction: the run record and every
job, each held as a delayed job due at its staggered time. Nothing sleeps in a
process: whichever worker runs the reaper next promotes the jobs that are due,
so a restart of any process loses nothing and the last repository of the
night is never cut off.

Each cron slot is planned once (``SET NX`` on the slot), however many
scheduler processes run or restart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis
from croniter import croniter

from orbital.errors import ConfigError
from orbital.fleet import Fleet
from orbital.ids import new_job_id
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings

__all__ = ["NightlyPlan", "NightlyRun", "Scheduler", "cron_fire", "next_nightly", "plan_nightly"]

logger = logging.getLogger(__name__)

#: A slot missed by more than this (the scheduler was down) is not planned late.
CATCH_UP_S = 6 * 3600


@dataclass(frozen=True)
class NightlyPlan:
    """The jobs of one nightly run, each with its due time."""

    run_id: str
    start_at: float
    jobs: tuple[tuple[Job, float], ...]
    slot: str = ""

    @property
    def total(self) -> int:
        return len(self.jobs)


@dataclass(frozen=True)
class NightlyRun:
    """A nightly run's record: totals so far and whether all its jobs ended."""

    run_id: str
    total: int
    ended: int
    passed: int
    failed: int
    cancelled: int
    superseded: int
    started_at: float
    finished_at: float
    pass_rate: float | None
    slot: str

    @property
    def finished(self) -> bool:
        return self.finished_at > 0

    @classmethod
    def from_mapping(cls, run_id: str, data: dict[bytes, bytes]) -> NightlyRun:
        text = {k.decode(): v.decode() for k, v in data.items()}

        def number(key: str) -> float:
            return float(text.get(key) or 0)

        passed, failed = int(number("passed")), int(number("failed"))
        rate = passed / (passed + failed) if passed + failed else None
        return cls(
            run_id=run_id,
            total=int(number("total")),
            ended=int(number("ended")),
            passed=passed,
            failed=failed,
            cancelled=int(number("cancelled")),
            superseded=int(number("superseded")),
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            pass_rate=rate,
            slot=text.get("slot", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "finished": self.finished}


def cron_fire(
    cron: str, at: float, *, previous: bool = False, setting: str = "nightly_cron"
) -> float:
    """Return when ``cron`` (UTC) fires next after ``at`` (or last, at or before it).

    Raises:
        ConfigError: naming ``setting``, if ``cron`` is not a cron expression or
            never fires ("0 2 30 2 *").
    """
    try:
        it = croniter(cron, datetime.fromtimestamp(at, UTC))
        return float(it.get_prev(float) if previous else it.get_next(float))
    except (ValueError, KeyError) as err:  # croniter's own errors are ValueErrors
        raise ConfigError(f"{setting} {cron!r} is not a usable cron expression: {err}") from None


def next_nightly(cron: str, after: float) -> float:
    """Return the first time after ``after`` (epoch seconds) that ``cron`` (UTC) fires.

    Raises:
        ConfigError: if ``cron`` is not a usable cron expression.
    """
    return cron_fire(cron, after)


def plan_nightly(
    fleet: Fleet,
    *,
    start_at: float,
    stagger_s: float,
    run_id: str = "",
    job_timeout_s: float = 3600.0,
    max_attempts: int = 3,
    slot: str = "",
) -> NightlyPlan:
    """Plan one integration-test job per eligible repository and arch.

    Jobs on the same arch queue are ``stagger_s`` apart, in registry order; the
    two arch queues start together.
    """
    run_id = run_id or new_job_id("n")
    per_queue: dict[str, int] = {}
    jobs = []
    for entry, arch in fleet.nightly_fanout():
        job = Job(
            type=JobType.INTEGRATION_TEST,
            repo=entry.repo,
            branch=entry.branch,
            arch=arch,
            trigger="nightly",
            nightly_id=run_id,
            timeout_s=job_timeout_s,
            max_attempts=max_attempts,
        )
        index = per_queue.get(job.queue, 0)
        per_queue[job.queue] = index + 1
        jobs.append((job, start_at + index * stagger_s))
    return NightlyPlan(run_id, start_at, tuple(jobs), slot)


class Scheduler:
    """Stores nightly plans and reads nightly runs."""

    def __init__(self, client: redis.Redis, settings: Settings, queue: Queue) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.queue = queue

    def submit(self, plan: NightlyPlan) -> NightlyRun:
        """Store the run record and all its jobs in one transaction."""
        record = {
            "run_id": plan.run_id,
            "total": plan.total,
            "started_at": plan.start_at,
            "planned_at": time.time(),
            "state": "running",
            "slot": plan.slot,
            "ended": 0,
            "passed": 0,
            "failed": 0,
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.nightly(plan.run_id), mapping={k: str(v) for k, v in record.items()}
            )
            pipe.zadd(self.keys.nightlies, {plan.run_id: plan.start_at})
            for job, due in plan.jobs:
                self.queue.enqueue_in(pipe, job, due_at=due)
            pipe.execute()
        logger.info(
            "nightly %s: planned %d job(s) from %s, staggered %.0f s per arch queue",
            plan.run_id,
            plan.total,
            _iso(plan.start_at),
            self.settings.nightly_stagger_s,
        )
        if plan.total == 0:
            self.client.hset(
                self.keys.nightly(plan.run_id),
                mapping={"finished_at": str(time.time()), "state": "finished"},
            )
        self.queue.promote_due()
        return self.get(plan.run_id)

    def fire_if_due(self, fleet: Fleet, now: float | None = None) -> NightlyRun | None:
        """Plan the nightly run of the latest cron slot at or before ``now`` if no
        process has planned it yet and it is not older than :data:`CATCH_UP_S`."""
        now = time.time() if now is None else now
        slot_time = cron_fire(self.settings.nightly_cron, now, previous=True)
        if now - slot_time > CATCH_UP_S:
            return None
        slot = _iso(slot_time)
        claimed = self.client.set(self.keys.nightly_fired(slot), "1", nx=True, ex=7 * 86400)
        if not claimed:
            return None
        plan = plan_nightly(
            fleet,
            start_at=max(slot_time, now - 60),
            stagger_s=self.settings.nightly_stagger_s,
            job_timeout_s=self.settings.job_timeout_s,
            max_attempts=self.settings.max_attempts,
            slot=slot,
        )
        return self.submit(plan)

    def get(self, run_id: str) -> NightlyRun:
        data = cast(dict[bytes, bytes], self.client.hgetall(self.keys.nightly(run_id)))
        if not data:
            raise KeyError(f"unknown nightly run {run_id!r}")
        return NightlyRun.from_mapping(run_id, data)

    def recent(self, limit: int = 10) -> list[NightlyRun]:
        ids = cast(list[bytes], self.client.zrevrange(self.keys.nightlies, 0, limit - 1))
        return [self.get(i.decode()) for i in ids]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
