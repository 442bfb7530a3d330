"""The worker and scheduler services as real subprocesses against the real Redis:
they read the shared ORBITAL_* configuration, log one line per lifecycle event, run
jobs, and stop cleanly on SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from tests.labs import LabFactory
from tests.test_agents import write_agent
from tests.test_sync import fleet_settings  # noqa: F401 - the fixture

SERVICES = Path(__file__).resolve().parents[1] / "services"
UNITS = SERVICES / "systemd"


class Service:
    """A service subprocess whose stderr lines are collected as they arrive."""

    def __init__(self, script: str, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVICES / script), *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> str:
        """Return the first log line matching ``pattern``, waiting for it."""
        deadline = time.monotonic() + timeout_s
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}; got:\n" + "\n".join(self.lines))

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit status (killed and failed after ``timeout_s``)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a service: no inherited ORBITAL_*, the test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")}
    env.update(
        ORBITAL_REDIS_URL=settings.redis_url, ORBITAL_PREFIX=settings.prefix, ORBITAL_HOME=str(settings.home),
        ORBITAL_LEASE_S=str(settings.lease_s), ORBITAL_HEARTBEAT_TTL_S=str(settings.heartbeat_ttl_s),
        ORBITAL_SECRETS=",".join(settings.secrets), ORBITAL_GIT_URL_TEMPLATE=settings.git_url_template,
        ORBITAL_FLEET_FILE=settings.fleet_file, ORBITAL_FRAMEWORK_REPO=settings.framework_repo,
    )  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Started services; any still running at the end are killed."""
    started: list[Service] = []
    yield started
    for service in started:
        service.close()


def start(services: list[Service], script: str, args: list[str], env: dict[str, str]) -> Service:
    service = Service(script, args, env)
    services.append(service)
    return service


def wait_state(queue: Queue, job: Job, states: set[str], timeout_s: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored = queue.get_job(job.id)
        if stored.state in states:
            return stored
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} is still {queue.get_job(job.id).state}")


# worker ---------------------------------------------------------------------------------
def test_manager_worker_service_runs_a_sync_job_and_stops_on_sigterm(
    fleet_settings: Settings,  # noqa: F811
    client: redis.Redis,
    services: list[Service],
) -> None:
    """The worker service serves the sync queue with --manager, runs a drift job, and
    on SIGTERM drains, withdraws its registration and exits 0, logging each step."""
    name = f"svc-mgr-{fleet_settings.prefix}"
    worker = start(services, "worker.py", ["--manager", "--arch", "amd64", "--name", name],
                   service_env(fleet_settings))  # fmt: skip
    worker.wait_for(
        rf"worker {name}: starting: queues agentx1, syncx1, test:amd64x2, Redis redis://"
    )
    worker.wait_for(rf"worker {name}: ready")

    queue = Queue(client, fleet_settings)
    job = Job(type=JobType.SYNC, params={"action": "drift"})
    queue.enqueue(job)
    assert wait_state(queue, job, {"passed", "failed", "error"}).state == "passed"
    worker.wait_for(rf"job {job.id} ended passed")

    assert worker.terminate() == 0
    for step in (
        "got SIGTERM",
        "draining",
        f"worker {name}: stopped",
        f"worker {name}: exited cleanly",
    ):
        worker.wait_for(step, timeout_s=1)
    assert not client.exists(Keys(fleet_settings.prefix).worker(name))
    assert not any(fleet_settings.redis_url in line for line in worker.lines if "@" in line)


def test_sigterm_lets_a_running_agent_job_finish(
    settings: Settings,
    labs: LabFactory,
    client: redis.Redis,
    services: list[Service],
    tmp_path: Path,
) -> None:
    """SIGTERM while an agent job runs: no new claims, the job finishes (passed), then
    the service exits 0."""
    labs.make("acme/lab", {"README.md": "lab\n"})
    agent = write_agent(tmp_path / "slow-agent")
    agent.write_text(agent.read_text().replace('print("Fixed:', 'time.sleep(2)\nprint("Fixed:'))
    configured = dataclasses.replace(settings, git_url_template=labs.template)
    env = service_env(configured, ORBITAL_AGENT_COMMAND=f"{agent},{{prompt}}")
    name = f"svc-agent-{settings.prefix}"
    worker = start(services, "worker.py", ["--queue", "agent=1", "--name", name], env)
    worker.wait_for(f"worker {name}: ready")

    queue = Queue(client, configured)
    job = Job(
        type=JobType.AGENT, repo="acme/lab", params={"action": "fix-issue", "issue_number": 1}
    )
    later = Job(
        type=JobType.AGENT, repo="acme/lab", params={"action": "fix-issue", "issue_number": 2}
    )
    queue.enqueue(job)
    wait_state(queue, job, {"running"})
    queue.enqueue(later)
    time.sleep(0.5)
    assert worker.terminate() == 0

    assert queue.get_job(job.id).state == "passed"
    assert queue.get_job(later.id).state == "queued"
    worker.wait_for("draining: no new claims; 1 running job", timeout_s=1)


def test_worker_service_refuses_a_bad_queue_option(
    settings: Settings, services: list[Service]
) -> None:
    """A configuration error exits 2 with the reason, before anything is claimed."""
    worker = start(services, "worker.py", ["--queue", "agent=zero"], service_env(settings))
    assert worker.process.wait(30) == 2
    worker.wait_for(r"cannot start: --queue 'agent=zero': expected a queue name", timeout_s=1)


# scheduler ------------------------------------------------------------------------------
def test_scheduler_service_plans_the_nightly_and_queues_drift_then_stops_on_sigterm(
    fleet_settings: Settings,  # noqa: F811
    client: redis.Redis,
    services: list[Service],
) -> None:
    """With slots due, the first pass plans the nightly and queues one drift job; a
    second scheduler adds nothing; SIGTERM stops each at once with exit 0."""
    env = service_env(
        fleet_settings, ORBITAL_NIGHTLY_CRON="* * * * *", ORBITAL_SYNC_CRON="* * * * *"
    )
    first = start(services, "scheduler.py", ["--tick", "30"], env)
    first.wait_for(
        r"scheduler service: started: nightly '\* \* \* \* \*', drift '\* \* \* \* \*', a pass every 30 s"
    )
    planned = first.wait_for(r"scheduler: nightly \S+ planned: \d+ job\(s\)")
    first.wait_for(r"sync: drift job \S+ queued for slot")
    second = start(services, "scheduler.py", ["--once"], env)
    assert second.process.wait(60) == 0

    queue = Queue(client, fleet_settings)
    assert queue.depth("sync") == 1
    total = int(re.search(r"planned: (\d+) job", planned).group(1))  # type: ignore[union-attr]
    assert total == 16  # 8 active registry entries, each on both archs
    assert len(client.zrange(Keys(fleet_settings.prefix).nightlies, 0, -1)) == 1

    started = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - started < 5
    first.wait_for("got SIGTERM; stopping after this pass", timeout_s=1)
    first.wait_for("scheduler service: stopped", timeout_s=1)


def test_scheduler_service_refuses_a_bad_cron(settings: Settings, services: list[Service]) -> None:
    """An unusable nightly_cron exits 2 at start, naming the setting."""
    scheduler = start(
        services, "scheduler.py", [], service_env(settings, ORBITAL_NIGHTLY_CRON="at two")
    )
    assert scheduler.process.wait(30) == 2
    scheduler.wait_for(
        r"cannot start: .*nightly_cron.*'at two'.*not a cron expression", timeout_s=1
    )


def test_scheduler_keeps_running_while_redis_is_unreachable(
    settings: Settings, services: list[Service]
) -> None:
    """A pass that cannot reach Redis logs the problem once and the service stays up."""
    env = service_env(
        settings, ORBITAL_REDIS_URL="redis://127.0.0.1:9/0", ORBITAL_SYNC_CRON="* * * * *"
    )
    scheduler = start(services, "scheduler.py", ["--tick", "0.2", "--no-nightly"], env)
    scheduler.wait_for("scheduler: Redis is unreachable", timeout_s=30)
    time.sleep(1)
    assert sum("unreachable" in line for line in scheduler.lines) == 1
    assert scheduler.terminate() == 0


# units ----------------------------------------------------------------------------------
def test_systemd_units_parse(tmp_path: Path) -> None:
    """systemd-analyze accepts the worker and scheduler units and the timer."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    names = ["orbital-worker.service", "orbital-scheduler.service", "orbital-scheduler-pass.service",
             "orbital-scheduler-pass.timer"]  # fmt: skip
    for name in names:
        text = (UNITS / name).read_text()
        text = text.replace("/opt/orbital/venv/bin/python", sys.executable).replace(
            "/opt/orbital/services", str(SERVICES)
        )
        (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in names)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "KillMode=mixed" in (UNITS / "orbital-worker.service").read_text()
