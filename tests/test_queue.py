"""The queue's promises, against a real Redis server: validation, ids, the
per-triple lock and deferral, cancel, and terminal states."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from orbital.errors import InvalidIdentifierError, UnknownJobError
from orbital.ids import new_job_id, validate_job_id
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings


def lab(repo: str = "acme/lab", branch: str = "main", arch: str = "amd64", **kw: object) -> Job:
    return Job(type=JobType.INTEGRATION_TEST, repo=repo, branch=branch, arch=arch, **kw)  # type: ignore[arg-type]


@pytest.fixture
def queue(client: redis.Redis, settings: Settings) -> Queue:
    return Queue(client, settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repo", "acme/lab;rm -rf /"),
        ("repo", "acme"),
        ("repo", "-acme/lab"),
        ("repo", "acme/.."),
        ("branch", "main; reboot"),
        ("branch", "-x"),
        ("branch", "feature/../../etc"),
        ("branch", "a\nb"),
        ("branch", "$(id)"),
        ("branch", "`id`"),
        ("branch", "x y"),
        ("commit", "HEAD~1"),
        ("commit", "abcdef1\n"),
        ("branch", "main\n"),
        ("repo", "acme/lab\n"),
        ("arch", "x86_64"),
        ("id", "Bad_ID"),
    ],
)
def test_enqueue_refuses_bad_identifiers_and_stores_nothing(
    queue: Queue, client: redis.Redis, settings: Settings, field: str, value: str
) -> None:
    """Identifiers from outside are checked before anything is stored."""
    job = lab()
    setattr(job, field, value)
    with pytest.raises(InvalidIdentifierError) as err:
        queue.enqueue(job)
    assert repr(value)[:20].strip("'") in str(err.value) or value[:10] in str(err.value)
    assert not client.keys(f"{settings.prefix}:*")


def test_job_ids_are_unique_across_processes_sortable_and_dns_labels() -> None:
    """Ids from several processes never collide, sort by time, and are DNS labels."""
    code = (
        "from orbital.ids import new_job_id; print('\\n'.join(new_job_id() for _ in range(2000)))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(3)
    ]
    ids = [i for out in outputs for i in out]
    assert len(set(ids)) == len(ids) == 6000
    for out in outputs:
        assert out == sorted(out)
    assert outputs[0][-1] < outputs[2][0]
    for job_id in ids[:100]:
        assert validate_job_id(job_id) == job_id
    assert new_job_id() > ids[-1]


def test_caller_supplied_id_is_kept_and_not_replaced(queue: Queue) -> None:
    """A given id is used as is; enqueueing it again changes nothing."""
    first = queue.enqueue(lab(id="pr-42-amd64"))
    again = queue.enqueue(lab(id="pr-42-amd64", branch="other"))
    assert first.outcome == "queued"
    assert first.job_id == "pr-42-amd64"
    assert again.outcome == "exists"
    assert again.state == "queued"
    assert queue.get_job("pr-42-amd64").branch == "main"


def test_second_trigger_is_deferred_third_supersedes_it(queue: Queue, settings: Settings) -> None:
    """One build per triple; the newest waiting trigger replaces the older."""
    a, b, c = lab(), lab(), lab()
    assert queue.enqueue(a).outcome == "queued"
    deferred = queue.enqueue(b)
    assert (deferred.outcome, deferred.holder) == ("deferred", a.id)
    assert queue.enqueue(c).outcome == "deferred"

    assert queue.depth("test:amd64") == 1
    old = queue.get_job(b.id)
    assert old.state == "superseded"
    assert old.superseded_by == c.id
    assert queue.get_job(c.id).state == "deferred"


def test_other_branch_and_arch_are_not_blocked(queue: Queue) -> None:
    """The lock is per repository + branch + arch."""
    assert queue.enqueue(lab()).outcome == "queued"
    assert queue.enqueue(lab(branch="dev")).outcome == "queued"
    assert queue.enqueue(lab(arch="arm64")).outcome == "queued"
    assert queue.depths() == {"test:amd64": 2, "test:arm64": 1}


def test_cancel_queued_job_releases_lock_and_promotes_deferred(
    queue: Queue, client: redis.Redis
) -> None:
    """Cancelling the holder lets the deferred job into the queue."""
    a, b = lab(), lab()
    queue.enqueue(a)
    queue.enqueue(b)
    result = queue.cancel(a.id, "operator said so")
    assert (result.outcome, result.previous) == ("cancelled", "queued")
    assert queue.get_job(a.id).state == "cancelled"
    assert queue.get_job(b.id).state == "queued"
    keys = Keys(queue.settings.prefix)
    assert client.lrange(keys.queue("test:amd64"), 0, -1) == [b.id.encode()]
    assert client.get(keys.lock("acme/lab|main|amd64")) == b.id.encode()


def test_cancelled_is_final(queue: Queue) -> None:
    """A second cancel reports the final state and changes nothing."""
    job = lab()
    queue.enqueue(job)
    queue.cancel(job.id)
    again = queue.cancel(job.id)
    assert (again.outcome, again.previous) == ("final", "cancelled")


def test_cancel_deferred_and_scheduled_jobs(queue: Queue, client: redis.Redis) -> None:
    """Waiting jobs of every kind end at once when cancelled."""
    holder, waiting = lab(), lab()
    later = lab(repo="acme/other")
    queue.enqueue(holder)
    queue.enqueue(waiting)
    queue.enqueue(later, due_at=queue.clock() + 3600)
    assert queue.cancel(waiting.id).previous == "deferred"
    assert queue.cancel(later.id).previous == "scheduled"
    keys = Keys(queue.settings.prefix)
    assert client.zcard(keys.delayed) == 0
    assert not client.exists(keys.deferred("acme/lab|main|amd64"))
    # The holder, finishing later, finds nothing to promote.
    assert queue.cancel(holder.id).outcome == "cancelled"
    assert not client.exists(keys.lock("acme/lab|main|amd64"))


def test_cancel_unknown_job(queue: Queue) -> None:
    """Cancelling an id that does not exist says so."""
    assert queue.cancel("j-nope").outcome == "unknown"
    with pytest.raises(UnknownJobError, match="j-nope"):
        queue.get_job("j-nope")


def test_stale_lock_of_an_ended_holder_is_taken_over(queue: Queue, client: redis.Redis) -> None:
    """A lock left pointing at a job that ended or vanished does not block the triple."""
    keys = Keys(queue.settings.prefix)
    client.set(keys.lock("acme/lab|main|amd64"), "j-vanished")
    assert queue.enqueue(lab()).outcome == "queued"


def test_delayed_job_is_admitted_when_due(queue: Queue) -> None:
    """A scheduled job waits in Redis and enters its queue once due."""
    job = lab()
    now = queue.clock()
    assert queue.enqueue(job, due_at=now + 0.2).outcome == "scheduled"
    assert queue.promote_due() == 0
    queue.clock = lambda: now + 1
    assert queue.promote_due() == 1
    assert queue.get_job(job.id).state == "queued"
    assert queue.depth("test:amd64") == 1


def test_events_are_written_with_the_transition(queue: Queue, client: redis.Redis) -> None:
    """Deferral and cancel write CloudEvents with real join fields into the outbox."""
    a, b = lab(), lab()
    queue.enqueue(a)
    queue.enqueue(b)
    queue.cancel(b.id)
    keys = Keys(queue.settings.prefix)
    events = [json.loads(fields[b"e"]) for _, fields in client.xrange(keys.outbox)]
    assert [e["type"] for e in events] == ["build.deferred", "build.cancelled"]
    deferred = events[0]
    assert deferred["id"] == f"{b.id}.build.deferred.0"
    assert deferred["data"]["holder.job_id"] == a.id
    assert deferred["data"]["repository.name"] == "acme/lab"
    assert deferred["data"]["arch"] == "amd64"
    assert "commit_sha" not in deferred["data"]  # unknown yet: left out, never a placeholder


def test_secrets_in_job_params_are_masked_before_storing(queue: Queue, client: redis.Redis) -> None:
    """A secret passed inside a job's parameters never reaches the job record."""
    job = lab(params={"note": "token s3cr3t-value", "nested": [{"t": "ghp_" + "x" * 36}], "n": 3})
    queue.enqueue(job)
    raw = client.hget(Keys(queue.settings.prefix).job(job.id), "params")
    assert raw is not None
    assert b"s3cr3t-value" not in raw
    assert b"ghp_" + b"x" * 36 not in raw
    assert queue.get_job(job.id).params["n"] == 3
