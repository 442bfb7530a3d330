"""Worker processes dying, pausing and losing Redis, against real processes and
a real Redis: jobs come back, run exactly once, and never run twice at a time."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from orbital.builds import BuildHistory
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from tests.conftest import RedisServer
from tests.labs import LabFactory


class WorkerProcess:
    """``orbital worker`` as a real child process."""

    def __init__(
        self, settings: Settings, name: str, capacity: int = 2, log: Path | None = None
    ) -> None:
        self.settings = settings
        self.name = name
        self.capacity = capacity
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        s = self.settings
        env = {
            **os.environ,
            "ORBITAL_REDIS_URL": s.redis_url,
            "ORBITAL_PREFIX": s.prefix,
            "ORBITAL_HOME": str(s.home),
            "ORBITAL_LEASE_S": str(s.lease_s),
            "ORBITAL_HEARTBEAT_TTL_S": str(s.heartbeat_ttl_s),
            "ORBITAL_GIT_URL_TEMPLATE": s.git_url_template,
            "ORBITAL_MAX_ATTEMPTS": str(s.max_attempts),
        }
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orbital",
                "-v",
                "worker",
                "--arch",
                "amd64",
                "--capacity",
                str(self.capacity),
                "--name",
                self.name,
                "--sandbox",
                "local",
            ],
            env=env,
            stdout=out,
            stderr=out,
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.process is not None and worker.process.poll() is None:
            worker.signal(signal.SIGCONT)
        worker.kill()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def env(settings: Settings, labs: LabFactory) -> Settings:
    return dataclasses.replace(settings, git_url_template=labs.template)


def lab_job(repo: str, **kw: object) -> Job:
    return Job(type=JobType.INTEGRATION_TEST, repo=repo, arch="amd64", **kw)  # type: ignore[arg-type]


def test_sigkilled_worker_job_reruns_after_restart(
    env: Settings,
    labs: LabFactory,
    client: redis.Redis,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """A worker killed mid-job: on restart under its name the job goes back to the
    head of its queue, runs again (attempt 2) and is recorded once."""
    marker = tmp_path / "runs"
    repo = labs.script_lab("acme/once", f"echo run >> {marker}\nsleep 2\n")
    queue = Queue(client, env)
    job = lab_job(repo)
    queue.enqueue(job)
    first = WorkerProcess(env, "w-kill").start()
    workers.append(first)
    wait_for(lambda: marker.exists(), 20, "the first run to start")
    first.kill()

    workers.append(WorkerProcess(env, "w-kill").start())
    wait_for(lambda: queue.get_job(job.id).is_terminal, 30, "the job to end")
    final = queue.get_job(job.id)
    assert final.state == "passed"
    assert final.attempts == 2
    assert BuildHistory(client, Keys(env.prefix)).count() == 1


def test_dead_workers_jobs_are_recovered_by_another_worker(
    env: Settings,
    labs: LabFactory,
    client: redis.Redis,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """A worker that dies for good: once its registration expires, another worker
    takes its job; after too many attempts a job ends as lost, visible in history."""
    marker = tmp_path / "runs"
    repo = labs.script_lab("acme/doomed", f"echo run >> {marker}\nsleep 30\n")
    env = dataclasses.replace(env, max_attempts=2)
    queue = Queue(client, env)
    job = lab_job(repo, max_attempts=2)
    queue.enqueue(job)

    for attempt, name in enumerate(["w-a", "w-b"], start=1):
        worker = WorkerProcess(env, name).start()
        workers.append(worker)
        wait_for(
            lambda a=attempt: marker.exists() and len(marker.read_text().split()) == a,
            30,
            f"run {attempt} to start",
        )
        worker.kill()

    survivor = WorkerProcess(env, "w-c").start()
    workers.append(survivor)
    wait_for(lambda: queue.get_job(job.id).is_terminal, 30, "the job to be declared lost")
    assert queue.get_job(job.id).state == "lost"
    record = BuildHistory(client, Keys(env.prefix)).get(job.id)
    assert record is not None
    assert record.status == "lost"
    assert not client.exists(Keys(env.prefix).lock(job.triple))


def test_paused_worker_never_runs_a_job_twice_at_once(
    env: Settings,
    labs: LabFactory,
    client: redis.Redis,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """A worker paused past its lease: its steps are killed by the watchdog before
    another worker may start the job, and its late results are discarded."""
    ticks = tmp_path / "ticks"
    repo = labs.script_lab(
        "acme/paused",
        f'for i in $(seq 60); do echo "$$ $(date +%s.%N)" >> {ticks}; sleep 0.1; done\n',
    )
    queue = Queue(client, env)
    job = lab_job(repo)
    queue.enqueue(job)
    paused = WorkerProcess(env, "w-paused", log=tmp_path / "paused.log").start()
    workers.append(paused)
    wait_for(
        lambda: ticks.exists() and len(ticks.read_text().splitlines()) > 5, 20, "the first run"
    )
    paused.signal(signal.SIGSTOP)

    other = WorkerProcess(env, "w-other", log=tmp_path / "other.log").start()
    workers.append(other)
    wait_for(lambda: queue.get_job(job.id).worker == "w-other", 30, "the job to move to w-other")
    time.sleep(1)
    paused.signal(signal.SIGCONT)
    wait_for(lambda: queue.get_job(job.id).is_terminal, 40, "the job to end")

    runs: dict[str, list[float]] = {}
    for line in ticks.read_text().splitlines():
        pid, stamp = line.split()
        runs.setdefault(pid, []).append(float(stamp))
    assert len(runs) == 2
    first, second = sorted(runs.values(), key=min)
    assert max(first) < min(second), "the two runs overlapped"
    assert queue.get_job(job.id).state == "passed"
    assert BuildHistory(client, Keys(env.prefix)).count() == 1


def test_worker_reconnects_after_redis_restart(
    env: Settings, labs: LabFactory, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Redis going away and coming back (empty) does not leave a worker idle."""
    import shutil

    server = RedisServer(shutil.which("redis-server") or "redis-server", tmp_path)
    server.start()
    env = dataclasses.replace(env, redis_url=server.url)
    repo = labs.script_lab("acme/after", "true\n")
    worker = WorkerProcess(env, "w-reconnect", log=tmp_path / "w.log").start()
    workers.append(worker)
    client = redis.Redis.from_url(server.url)
    keys = Keys(env.prefix)
    wait_for(lambda: client.exists(keys.worker("w-reconnect")) == 1, 20, "registration")

    server.stop()
    time.sleep(2)
    server.start()
    client = redis.Redis.from_url(server.url)
    queue = Queue(client, env)
    job = lab_job(repo)
    queue.enqueue(job)
    wait_for(lambda: queue.get_job(job.id).is_terminal, 30, "the job after the restart")
    assert queue.get_job(job.id).state == "passed"
    wait_for(lambda: client.exists(keys.worker("w-reconnect")) == 1, 10, "re-registration")
    server.stop()


@pytest.mark.slow
@pytest.mark.timeout(1000)  # its own wait is bounded at 900 s; the suite default is 300 s
def test_two_hundred_jobs_survive_ten_sigkills(
    env: Settings,
    labs: LabFactory,
    client: redis.Redis,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """200 jobs, a worker SIGKILLed 10 times at random moments and restarted:
    every job ends exactly once, none lost, no duplicate builds, no lock left."""
    labs.script_lab("acme/shared", "sleep 0.$((RANDOM % 4 + 1))\n")
    env = dataclasses.replace(
        env, max_attempts=50, git_url_template=f"file://{labs.root / 'repos'}/acme/shared.git"
    )
    queue = Queue(client, env)
    jobs = [lab_job(f"acme/r{i:03d}", max_attempts=50) for i in range(200)]
    for job in jobs:
        queue.enqueue(job)

    steady = WorkerProcess(env, "w-steady", capacity=3).start()
    victim = WorkerProcess(env, "w-victim", capacity=3).start()
    workers.extend([steady, victim])
    rng = random.Random(7)
    keys = Keys(env.prefix)
    for _ in range(10):
        time.sleep(rng.uniform(0.3, 2.0))
        victim.kill()
        victim = WorkerProcess(env, "w-victim", capacity=3).start()
        workers.append(victim)

    def done() -> bool:
        return client.zcard(keys.jobs_ended) == 200

    # Generous: a loaded 2-core CI machine runs ~1,000 steps here; the test is about
    # correctness (exactly once, nothing lost), not speed.
    wait_for(done, 900, "all 200 jobs to end")
    states = [queue.get_job(j.id).state for j in jobs]
    assert states.count("passed") == 200, {s: states.count(s) for s in set(states)}
    assert client.zcard(keys.builds_all) == 200
    assert len(client.keys(f"{env.prefix}:build:*")) == 200
    assert not client.keys(f"{env.prefix}:lock:*")
    assert not client.keys(f"{env.prefix}:deferred:*")
    assert sum(client.llen(k) for k in client.keys(f"{env.prefix}:worker:*:claimed")) == 0
    assert client.zcard(keys.jobs_active) == 0
