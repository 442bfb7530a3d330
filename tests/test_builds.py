"""Build history through the real finish path: indexes by time, repository and
triple, the triage queue, pass rates, and exactly-once records."""

from __future__ import annotations

import pytest
import redis

from orbital.builds import BuildHistory
from orbital.connection import async_client
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import AsyncQueue, Queue
from orbital.settings import Settings

pytestmark = pytest.mark.anyio


async def run_through(
    settings: Settings,
    client: redis.Redis,
    repo: str,
    status: str,
    arch: str = "amd64",
    branch: str = "main",
) -> Job:
    """Enqueue, claim, start and finish one job with ``status``."""
    job = Job(type=JobType.INTEGRATION_TEST, repo=repo, branch=branch, arch=arch)
    Queue(client, settings).enqueue(job)
    aclient = async_client(settings.redis_url)
    queue = AsyncQueue(aclient, settings)
    assert await queue.claim(job.queue, "w1", 1) == job.id
    assert (await queue.start(job.id, "w1", "tok"))[0] == "ok"
    build = {
        "job_id": job.id,
        "type": job.type.value,
        "repo": repo,
        "branch": branch,
        "arch": arch,
        "status": status,
        "steps": [],
    }
    assert (await queue.finish(job.id, "w1", "tok", status, build=build))[0] == "ended"
    await aclient.aclose()
    return job


async def test_history_by_repo_and_triple_newest_first(
    client: redis.Redis, settings: Settings
) -> None:
    """Queries return the newest builds of the repository or triple asked for."""
    ids = [await run_through(settings, client, "acme/a", "passed") for _ in range(3)]
    await run_through(settings, client, "acme/b", "failed")
    await run_through(settings, client, "acme/a", "passed", arch="arm64")
    history = BuildHistory(client, Keys(settings.prefix))
    assert [b.job_id for b in history.for_triple("acme/a", "main", "amd64")] == [
        j.id for j in reversed(ids)
    ]
    assert len(history.for_repo("acme/a")) == 4
    assert history.recent(1)[0].arch == "arm64"
    assert history.count() == 5


async def test_triage_counts_consecutive_failures_worst_first(
    client: redis.Redis, settings: Settings
) -> None:
    """Failures in a row raise a triple in the triage queue; a pass clears it."""
    for _ in range(3):
        await run_through(settings, client, "acme/worst", "failed")
    await run_through(settings, client, "acme/bad", "timed_out")
    await run_through(settings, client, "acme/fixed", "failed")
    await run_through(settings, client, "acme/fixed", "passed")
    history = BuildHistory(client, Keys(settings.prefix))
    triage = history.triage()
    assert [(t.repo, t.consecutive_failures) for t in triage] == [
        ("acme/worst", 3),
        ("acme/bad", 1),
    ]
    assert triage[0].last_build is not None
    assert triage[0].last_build.status == "failed"
    assert history.consecutive_failures("acme/fixed", "main", "amd64") == 0


async def test_pass_rate_over_a_window(client: redis.Redis, settings: Settings) -> None:
    """Pass rate counts builds that ended within the window, fleet-wide or per repo."""
    for status in ("passed", "passed", "failed"):
        await run_through(settings, client, "acme/x", status)
    await run_through(settings, client, "acme/y", "passed")
    history = BuildHistory(client, Keys(settings.prefix))
    assert history.pass_rate(3600, repo="acme/x") == pytest.approx(2 / 3)
    assert history.pass_rate(3600) == pytest.approx(3 / 4)
    assert history.pass_rate(3600, repo="acme/none") is None


async def test_stale_worker_cannot_write_a_second_record(
    client: redis.Redis, settings: Settings
) -> None:
    """A finish with an old fencing token is refused: one job, one record."""
    job = await run_through(settings, client, "acme/a", "passed")
    aclient = async_client(settings.redis_url)
    queue = AsyncQueue(aclient, settings)
    outcome, state = await queue.finish(job.id, "w1", "tok", "failed", build={"status": "failed"})
    assert (outcome, state) == ("stale", "passed")
    await aclient.aclose()
    assert BuildHistory(client, Keys(settings.prefix)).get(job.id).status == "passed"  # type: ignore[union-attr]


async def test_finish_after_cancel_keeps_cancelled(client: redis.Redis, settings: Settings) -> None:
    """A worker finishing a job that was cancelled meanwhile records cancelled."""
    job = Job(type=JobType.INTEGRATION_TEST, repo="acme/c", arch="amd64")
    Queue(client, settings).enqueue(job)
    aclient = async_client(settings.redis_url)
    queue = AsyncQueue(aclient, settings)
    await queue.claim(job.queue, "w1", 1)
    await queue.start(job.id, "w1", "tok")
    assert Queue(client, settings).cancel(job.id).outcome == "cancelling"
    assert await queue.renew(job.id, "w1", "tok") == "cancelled"
    outcome, state = await queue.finish(
        job.id,
        "w1",
        "tok",
        "passed",
        build={"job_id": job.id, "repo": "acme/c", "status": "passed"},
    )
    await aclient.aclose()
    assert (outcome, state) == ("ended", "cancelled")
    record = BuildHistory(client, Keys(settings.prefix)).get(job.id)
    assert record is not None
    assert record.status == "cancelled"
