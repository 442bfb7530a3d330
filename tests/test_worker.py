"""The worker running real lab jobs in the local sandbox against a real Redis:
pipeline results, back-pressure, cancel, timeouts, secret masking, drain."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis

from orbital.builds import BuildHistory, BuildRecord
from orbital.connection import async_client
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.logs import read_log
from orbital.queue import Queue
from orbital.sandboxes.select import make_provider
from orbital.settings import Settings
from orbital.workers import Worker, WorkerConfig
from tests.labs import LabFactory

pytestmark = pytest.mark.anyio


async def run_worker(
    settings: Settings,
    until: Callable[[], bool],
    *,
    capacity: int = 2,
    timeout_s: float = 30.0,
    during: Callable[[Worker], None] | None = None,
) -> Worker:
    """Run an in-process worker until ``until()`` holds, then drain it."""
    provider = make_provider(settings, "local", "w-test")
    worker = Worker(
        settings,
        WorkerConfig(
            arch="amd64", capacity={"test:amd64": capacity}, name="w-test", drain_timeout_s=5
        ),
        provider,
        client=async_client(settings.redis_url),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker.run(handle_signals=False))
        with anyio.fail_after(timeout_s):
            while not until():
                if during is not None:
                    during(worker)
                await anyio.sleep(0.05)
        worker.drain()
    return worker


def enqueue(queue: Queue, repo: str, **kw: object) -> Job:
    job = Job(type=kw.pop("type", JobType.INTEGRATION_TEST), repo=repo, arch="amd64", **kw)  # type: ignore[arg-type]
    queue.enqueue(job)
    return job


def ended(queue: Queue, *jobs: Job) -> Callable[[], bool]:
    return lambda: all(queue.get_job(j.id).is_terminal for j in jobs)


def build_of(client: redis.Redis, settings: Settings, job: Job) -> BuildRecord:
    record = BuildHistory(client, Keys(settings.prefix)).get(job.id)
    assert record is not None, f"no build record for {job.id}"
    return record


@pytest.fixture
def lab_env(settings: Settings, labs: LabFactory) -> Settings:
    return dataclasses.replace(settings, git_url_template=labs.template)


async def test_passing_lab_runs_every_stage(lab_settings: Settings, client: redis.Redis) -> None:
    """A lab with BATS tests and assertions passes with one step per test and assertion."""
    queue = Queue(client, lab_settings)
    job = enqueue(queue, "orbital-demo/lab-kubernetes-101")
    await run_worker(lab_settings, ended(queue, job))

    record = build_of(client, lab_settings, job)
    assert record.status == "passed"
    assert [s.name for s in record.steps] == [
        "clone",
        "bats:basics.bats:greeting script exists",
        "bats:basics.bats:arithmetic still works",
        "post-create",
        "post-start",
        "cluster-up",
        "app-deployed",
        "integration",
    ]
    assert len(record.commit_sha) == 40
    assert record.framework_version == "1.2.0"
    assert record.worker == "w-test"
    assert record.sandbox["kind"] == "local"
    assert record.queue_wait_s >= 0
    assert record.setup_s > 0
    assert record.run_s > 0
    assert Path(record.log_path).read_bytes() == read_log(client, Keys(lab_settings.prefix), job.id)
    assert not client.exists(
        Keys(lab_settings.prefix).lock("orbital-demo/lab-kubernetes-101|main|amd64")
    )


async def test_failed_assertion_is_the_failed_step(
    lab_settings: Settings, client: redis.Redis
) -> None:
    """A failing result.jsonl assertion fails the build and names the assertion."""
    queue = Queue(client, lab_settings)
    job = enqueue(queue, "orbital-demo/lab-business-events")
    await run_worker(lab_settings, ended(queue, job))
    record = build_of(client, lab_settings, job)
    assert record.status == "failed"
    assert record.failed_step == "frontend-http"
    assert "expected HTTP 200 from frontend, got 503" in record.failure_summary
    assert len(record.failure_summary) <= 500


async def test_bats_failure_skips_stage_two(lab_settings: Settings, client: redis.Redis) -> None:
    """Any BATS failure skips post-create, post-start and integration."""
    queue = Queue(client, lab_settings)
    job = enqueue(queue, "orbital-demo/lab-log-ingest")
    await run_worker(lab_settings, ended(queue, job))
    record = build_of(client, lab_settings, job)
    assert record.status == "failed"
    assert record.failed_step == "bats:basics.bats:required variable DT_ENDPOINT is documented"
    assert {s.name: s.status.value for s in record.steps}["integration"] == "skipped"
    assert (
        "post-create: installing tools"
        not in read_log(client, Keys(lab_settings.prefix), job.id).decode()
    )


async def test_unit_test_job_stops_after_stage_one(
    lab_settings: Settings, client: redis.Redis
) -> None:
    """A unit-test job runs clone and BATS only."""
    queue = Queue(client, lab_settings)
    job = enqueue(queue, "orbital-demo/lab-kubernetes-101", type=JobType.UNIT_TEST)
    await run_worker(lab_settings, ended(queue, job))
    record = build_of(client, lab_settings, job)
    assert record.status == "passed"
    assert [s.name.split(":")[0] for s in record.steps] == ["clone", "bats", "bats"]


async def test_missing_branch_fails_and_never_falls_back(
    lab_settings: Settings, client: redis.Redis
) -> None:
    """A branch that does not exist fails the clone step; main is not tested instead."""
    queue = Queue(client, lab_settings)
    job = enqueue(queue, "orbital-demo/lab-kubernetes-101", branch="no-such-branch")
    await run_worker(lab_settings, ended(queue, job))
    record = build_of(client, lab_settings, job)
    assert record.status == "failed"
    assert record.failed_step == "clone"
    assert "no-such-branch" in record.failure_summary
    assert [s.name for s in record.steps] == ["clone"]


async def test_commit_is_checked_out(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """A requested commit is tested, not the branch head."""
    repo = labs.make(
        "acme/pinned",
        {".devcontainer/test/integration.sh": "test -f first\n", "first": "1"},
        branches={"main2": {"second": "2"}},
    )
    import subprocess

    sha = subprocess.run(
        ["git", "rev-parse", "main"],
        cwd=labs.root / "src" / repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo, commit=sha)
    await run_worker(lab_env, ended(queue, job))
    assert build_of(client, lab_env, job).commit_sha == sha


async def test_back_pressure_runs_exactly_capacity(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """With capacity 2 and 5 jobs queued, 2 run and 3 stay in the Redis queue."""
    queue = Queue(client, lab_env)
    jobs = [enqueue(queue, labs.script_lab(f"acme/slow-{i}", "sleep 30\n")) for i in range(5)]
    seen: list[tuple[int, int]] = []

    def observe(worker: Worker) -> None:
        seen.append((len(worker.running_job_ids), queue.depth("test:amd64")))

    def two_running() -> bool:
        return sum(queue.get_job(j.id).state == "running" for j in jobs) == 2 and len(seen) > 20

    await run_worker(lab_env, two_running, capacity=2, during=observe)
    states = [queue.get_job(j.id).state for j in jobs]
    assert states.count("running") + states.count("queued") == 5
    assert max(r for r, _ in seen) == 2
    assert seen[-1] == (2, 3)
    for j in jobs:
        queue.cancel(j.id)


async def test_cancel_running_job_kills_its_process_group(
    lab_env: Settings, labs: LabFactory, client: redis.Redis, tmp_path: Path
) -> None:
    """Cancelling a running job kills the step and what it started; cancelled is final."""
    pidfile = tmp_path / "pids"
    repo = labs.script_lab(
        "acme/hang",
        f"sleep 300 & echo $! >> {pidfile}\nsetsid sleep 301 & echo $! >> {pidfile}\nsleep 302\n",
    )
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo)

    def cancel_when_running(_: Worker) -> None:
        if (
            pidfile.exists()
            and len(pidfile.read_text().split()) == 2
            and queue.get_job(job.id).state == "running"
        ):
            queue.cancel(job.id, "test cancel")

    await run_worker(lab_env, ended(queue, job), during=cancel_when_running)
    record = build_of(client, lab_env, job)
    assert queue.get_job(job.id).state == "cancelled"
    assert record.status == "cancelled"
    for pid in map(int, pidfile.read_text().split()):
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
    assert queue.cancel(job.id).outcome == "final"


async def test_step_timeout_records_timed_out(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """A step past its timeout is killed and the build is timed_out."""
    repo = labs.script_lab("acme/stuck", "sleep 60\n")
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo, params={"step_timeout_s": 4})
    await run_worker(lab_env, ended(queue, job))
    record = build_of(client, lab_env, job)
    assert record.status == "timed_out"
    assert record.failed_step == "integration"
    assert "timed out after 4 s" in record.failure_summary


async def test_job_timeout_records_timed_out(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """A job past its own timeout is killed and recorded as timed_out with the steps so far."""
    repo = labs.script_lab("acme/slowjob", "sleep 120\n", post_create="echo setting up\n")
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo, timeout_s=6)
    started = time.monotonic()
    await run_worker(lab_env, ended(queue, job), timeout_s=60)
    assert time.monotonic() - started < 60
    record = build_of(client, lab_env, job)
    assert record.status == "timed_out"
    assert (record.steps[0].name, record.steps[0].status.value) == ("clone", "passed")
    assert record.steps[-1].name == "job"
    assert "timed out" in record.steps[-1].error


async def test_secrets_are_masked_in_logs_records_and_events(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """Configured secret values and token shapes never reach the log, the record or events."""
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    repo = labs.script_lab(
        "acme/leaky",
        f"printf 's3cr3t'; printf -- '-value and {token[:10]}'; echo '{token[10:]}'\n"
        f'echo \'{{"step":"leak","status":"fail","error":"token s3cr3t-value"}}\' >> "$RESULT_JSON"\n'
        "exit 1\n",
    )
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo)
    await run_worker(lab_env, ended(queue, job))
    keys = Keys(lab_env.prefix)
    log = read_log(client, keys, job.id)
    record_raw = client.get(keys.build(job.id))
    events = b"".join(f[b"e"] for _, f in client.xrange(keys.outbox))
    job_raw = b"".join(client.hgetall(keys.job(job.id)).values())
    for blob in (
        log,
        record_raw or b"",
        events,
        job_raw,
        Path(build_of(client, lab_env, job).log_path).read_bytes(),
    ):
        assert b"s3cr3t-value" not in blob
        assert token.encode() not in blob
        assert token[10:].encode() not in blob
    assert b"***" in log


async def test_drain_lets_running_job_finish(
    lab_env: Settings, labs: LabFactory, client: redis.Redis
) -> None:
    """On drain the worker stops claiming and the running job still completes."""
    repo = labs.script_lab("acme/short", "sleep 1\n")
    other = labs.script_lab("acme/waiting", "true\n")
    queue = Queue(client, lab_env)
    job = enqueue(queue, repo)

    def drain_once_running(worker: Worker) -> None:
        if queue.get_job(job.id).state == "running":
            worker.drain()
            if queue.depth("test:amd64") == 0 and not client.exists(
                Keys(lab_env.prefix).job("late")
            ):
                enqueue(queue, other, id="late")

    await run_worker(lab_env, ended(queue, job), capacity=1, during=drain_once_running)
    await anyio.sleep(0.5)
    assert queue.get_job(job.id).state == "passed"
    assert queue.get_job("late").state == "queued"


async def test_worker_registration_is_complete_and_withdrawn(
    lab_env: Settings, client: redis.Redis
) -> None:
    """A running worker publishes its whole registration with a TTL; a clean stop removes it."""
    keys = Keys(lab_env.prefix)
    snapshot: dict[bytes, bytes] = {}

    def grab(_: Worker) -> None:
        snapshot.update(client.hgetall(keys.worker("w-test")))

    start = time.monotonic()
    await run_worker(
        lab_env, lambda: bool(snapshot) and time.monotonic() - start > 0.3, during=grab
    )
    for field in (
        b"arch",
        b"capacity",
        b"active",
        b"status",
        b"host",
        b"last_heartbeat",
        b"sandbox",
    ):
        assert field in snapshot
    assert snapshot[b"status"] == b"ready"
    assert not client.exists(keys.worker("w-test"))


def test_dead_pids_do_not_linger(tmp_path: Path) -> None:
    """Sanity: /proc checks used above see a killed process as gone."""
    pid = os.getpid()
    assert Path(f"/proc/{pid}").exists()


async def test_handler_crash_ends_job_as_error(settings: Settings, client: redis.Redis) -> None:
    """A handler that raises ends its job as error once, not in a retry loop."""

    async def broken(ctx: object) -> object:
        raise RuntimeError("handler bug")

    queue = Queue(client, settings)
    job = Job(type=JobType.SYNC, repo="acme/lab", params={"action": "drift"})
    queue.enqueue(job)
    worker = Worker(
        settings,
        WorkerConfig(
            arch="amd64", capacity={"sync": 1}, name="w-crash", handlers={JobType.SYNC: broken}
        ),  # type: ignore[dict-item]
        make_provider(settings, "local", "w-crash"),
        client=async_client(settings.redis_url),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker.run(handle_signals=False))
        with anyio.fail_after(20):
            while not queue.get_job(job.id).is_terminal:
                await anyio.sleep(0.05)
        worker.drain()
    stored = queue.get_job(job.id)
    assert stored.state == "error"
    assert stored.attempts == 1
    assert "RuntimeError: handler bug" in stored.error


async def test_worker_heartbeat_events_every_nth_beat(
    lab_env: Settings, client: redis.Redis
) -> None:
    """The worker emits worker.heartbeat periodically (every Nth beat), not on every beat."""
    fast = dataclasses.replace(lab_env, heartbeat_ttl_s=0.3, heartbeat_event_every=3)
    keys = Keys(fast.prefix)
    start = time.monotonic()
    await run_worker(fast, lambda: time.monotonic() - start > 1.6)
    import json

    events = [json.loads(f[b"e"]) for _, f in client.xrange(keys.outbox)]
    beats = [e for e in events if e["type"] == "worker.heartbeat"]
    # 1.6 s at one beat per 0.1 s is at most 16 beats: at most 5 events at every 3rd (+1 slack).
    assert 2 <= len(beats) <= 6
    assert beats[0]["data"]["worker_id"] == "w-test"
