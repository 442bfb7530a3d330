"""Nightly planning against the real registry and a real Redis: fan-out,
staggering, delayed jobs that survive restarts, and the nightly run record."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from orbital.errors import ConfigError
from orbital.fleet import load_fleet
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.scheduler import Scheduler, next_nightly, plan_nightly
from orbital.settings import Settings


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_real_fleet_plans_47_jobs_staggered_per_arch(shared_dir: Path) -> None:
    """The real registry fans out to 47 jobs; each arch queue is staggered 5 minutes."""
    fleet = load_fleet(shared_dir / "fleet" / "repos.yaml")
    start = ts("2026-12-05T02:00:00")
    plan = plan_nightly(fleet, start_at=start, stagger_s=300)
    assert plan.total == 47
    per_arch = Counter(job.arch for job, _ in plan.jobs)
    assert per_arch == {"amd64": 25, "arm64": 22}
    amd = sorted(due for job, due in plan.jobs if job.arch == "amd64")
    assert amd[0] == start
    assert amd[-1] == start + 24 * 300
    assert all(b - a == 300 for a, b in itertools.pairwise(amd))
    assert {job.trigger for job, _ in plan.jobs} == {"nightly"}
    assert {job.nightly_id for job, _ in plan.jobs} == {plan.run_id}


def test_cron_default_is_two_am_utc() -> None:
    """The default schedule fires at 02:00 UTC; a bad expression is a clear error."""
    assert next_nightly("0 2 * * *", ts("2026-12-04T16:00:00")) == ts("2026-12-05T02:00:00")
    with pytest.raises(ConfigError, match="not a usable cron expression"):
        next_nightly("every night", 0)


def test_plan_is_stored_as_delayed_jobs_that_survive_restarts(
    client: redis.Redis, settings: Settings, shared_dir: Path
) -> None:
    """A submitted plan lives in Redis: no process holds it, and due jobs are promoted."""
    fleet = load_fleet(shared_dir / "fleet" / "repos.yaml")
    queue = Queue(client, settings)
    now = queue.clock()
    plan = plan_nightly(fleet, start_at=now + 3600, stagger_s=300)
    run = Scheduler(client, settings, queue).submit(plan)
    keys = Keys(settings.prefix)
    assert run.total == 47
    assert run.ended == 0
    assert client.zcard(keys.delayed) == 47

    # A new process (a fresh client) later promotes what is due.
    later = Queue(redis.Redis.from_url(settings.redis_url), settings)
    later.clock = lambda: now + 3600 + 301
    assert later.promote_due() == 4  # two per arch queue: t+0 and t+300
    assert later.depths() == {"test:amd64": 2, "test:arm64": 2}
    later.clock = lambda: now + 3600 + 24 * 300 + 1
    assert later.promote_due() == 43
    assert client.zcard(keys.delayed) == 0


def test_each_cron_slot_is_planned_once(
    client: redis.Redis, settings: Settings, shared_dir: Path
) -> None:
    """Two schedulers (or a restart) plan one slot once; a long-missed slot is skipped."""
    fleet = load_fleet(shared_dir / "fleet" / "repos.yaml")
    queue = Queue(client, settings)
    settings = dataclasses.replace(settings, nightly_stagger_s=300)
    first = Scheduler(client, settings, queue)
    second = Scheduler(redis.Redis.from_url(settings.redis_url), settings, queue)
    at = ts("2026-12-05T02:00:30")
    run = first.fire_if_due(fleet, now=at)
    assert run is not None
    assert run.slot == "2026-12-05T02:00:00Z"
    assert second.fire_if_due(fleet, now=at + 10) is None
    assert first.fire_if_due(fleet, now=ts("2026-12-06T09:00:00")) is None


def test_nightly_run_record_closes_when_all_jobs_end(
    client: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """The run's totals count every ending; the last one finishes the run and emits a summary."""
    registry = tmp_path / "repos.yaml"
    registry.write_text(
        "repos:\n  - name: a\n    repo: acme/a\n    status: active\n    arch: amd64\n"
        "  - name: b\n    repo: acme/b\n    status: active\n"
    )
    queue = Queue(client, settings)
    scheduler = Scheduler(client, settings, queue)
    run = scheduler.submit(plan_nightly(load_fleet(registry), start_at=queue.clock(), stagger_s=0))
    assert run.total == 3
    ids = [j.id for j in queue.active_jobs()]
    for job_id in ids:
        queue.cancel(job_id)
    done = scheduler.get(run.run_id)
    assert done.finished
    assert done.ended == 3
    assert done.cancelled == 3
    keys = Keys(settings.prefix)
    summaries = [f[b"e"] for _, f in client.xrange(keys.outbox) if b"nightly.summary" in f[b"e"]]
    assert len(summaries) == 1


def test_superseded_nightly_job_still_closes_the_run(
    client: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """A nightly job replaced by a newer trigger counts as ended, so the run closes."""
    registry = tmp_path / "repos.yaml"
    registry.write_text(
        "repos:\n  - name: a\n    repo: acme/a\n    status: active\n    arch: amd64\n"
    )
    queue = Queue(client, settings)
    scheduler = Scheduler(client, settings, queue)
    holder = Job(type=JobType.INTEGRATION_TEST, repo="acme/a", arch="amd64")
    queue.enqueue(holder)
    run = scheduler.submit(plan_nightly(load_fleet(registry), start_at=queue.clock(), stagger_s=0))
    nightly_job = next(j for j in queue.active_jobs() if j.nightly_id == run.run_id)
    assert nightly_job.state == "deferred"
    queue.enqueue(Job(type=JobType.INTEGRATION_TEST, repo="acme/a", arch="amd64"))
    done = scheduler.get(run.run_id)
    assert done.finished
    assert (done.ended, done.superseded) == (1, 1)


def test_cron_that_never_fires_is_a_clear_error() -> None:
    """A well-formed cron with no real date (30 February) is refused by name."""
    with pytest.raises(ConfigError, match="nightly_cron '0 2 30 2 \\*' is not a usable"):
        next_nightly("0 2 30 2 *", 0)
