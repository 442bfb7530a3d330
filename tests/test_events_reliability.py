"""Reliability of event delivery with the real shipper service (services/shipper.py) in a
subprocess: ingest outages, SIGKILL mid-batch and during backoff, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orbital.events import emit
from orbital.events.outbox import lock_key
from orbital.keys import Keys
from orbital.settings import Settings
from tests.dynatrace_fake import FakeDynatrace, job_events, order_by_subject, outbox_settled

pytestmark = pytest.mark.slow

TOKEN = "dt0c01.RELIABILITYTOKEN.0123456789abcdef"
SERVICE = Path(__file__).resolve().parents[1] / "services" / "shipper.py"


class ShipperProcess:
    """One run of services/shipper.py, logging to a file."""

    def __init__(self, settings: Settings, fake: FakeDynatrace, name: str, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")}
        env.update(
            ORBITAL_REDIS_URL=settings.redis_url,
            ORBITAL_PREFIX=settings.prefix,
            ORBITAL_HOME=str(settings.home),
            ORBITAL_DT_ENVIRONMENT=fake.environment,
            ORBITAL_DT_API_TOKEN=TOKEN,
            ORBITAL_SHIPPER_NAME=name,
            ORBITAL_SHIPPER_BATCH_SIZE="100",
            ORBITAL_SHIPPER_POLL_S="0.05",
            ORBITAL_SHIPPER_BACKOFF_S="0.05",
            ORBITAL_SHIPPER_BACKOFF_MAX_S="0.4",
            ORBITAL_SHIPPER_LOCK_TTL_S="1",
            ORBITAL_SHIPPER_TIMEOUT_S="10",
        )
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVICE), "--log-level", "DEBUG"],
                env=env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def fake() -> Iterator[FakeDynatrace]:
    server = FakeDynatrace(TOKEN).start()
    yield server
    server.down()


@pytest.fixture
def shippers(settings: Settings, fake: FakeDynatrace, tmp_path: Path) -> Iterator[Any]:
    """A factory of shipper processes; any still running at the end is killed."""
    started: list[ShipperProcess] = []

    def start(name: str) -> ShipperProcess:
        process = ShipperProcess(settings, fake, name, tmp_path / f"{name}.log")
        started.append(process)
        return process

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.kill()


def emit_all(client: redis.Redis, settings: Settings, events: list[dict[str, Any]]) -> None:
    keys = Keys(settings.prefix)
    for event in events:
        emit(client, keys, event)


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def settled(client: redis.Redis, settings: Settings) -> bool:
    return outbox_settled(client, Keys(settings.prefix))


def received_in_order(fake: FakeDynatrace, events: list[dict[str, Any]]) -> bool:
    with fake.lock:
        received = list(fake.accepted)
    return order_by_subject(received) == order_by_subject(events)


def test_ingest_outage_then_recovery_delivers_everything_exactly_once(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, shippers: Any
) -> None:
    """Events keep coming while the ingest API is down for 3 s (then flaky: 503, 429):
    afterwards every event has arrived exactly once, each job's in order."""
    events = job_events(settings.prefix, jobs=6, per_job=100)
    shipper = shippers("outage")

    def produce() -> None:
        for index in range(0, len(events), 20):
            emit_all(client, settings, events[index : index + 20])
            time.sleep(0.03)

    producer = threading.Thread(target=produce)
    producer.start()
    assert fake.wait_for(20)
    fake.down()
    time.sleep(3.0)
    fake.fail_next = [503, 503, 429]
    fake.retry_after = "0"
    fake.up()
    producer.join()

    wait_until(lambda: settled(client, settings), 60, "the outbox to drain")
    assert fake.duplicates() == {}
    assert sorted(fake.accepted_ids()) == sorted(e["id"] for e in events)
    assert received_in_order(fake, events)
    log = shipper.text()
    assert "no answer (connection refused)" in log
    assert TOKEN not in log


def test_shipper_killed_mid_batch_loses_nothing(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, shippers: Any
) -> None:
    """SIGKILL while a batch is at the API: the next shipper takes over the dead one's
    unsettled entries and every event arrives; the only repeats are the batch that was
    in flight (the documented window between a 2xx and the acknowledgement)."""
    events = job_events(settings.prefix, jobs=3, per_job=100)
    emit_all(client, settings, events)
    fake.delay_s = 2.0
    first = shippers("first")

    assert fake.body_received.wait(20), "the first shipper never sent"
    first.kill()
    fake.delay_s = 0.0
    with fake.lock:
        in_flight = {str(e["id"]) for e in json.loads(fake.requests[0].body)}
    second = shippers("second")

    wait_until(lambda: settled(client, settings), 60, "the outbox to drain")
    time.sleep(2.5)  # let the killed request's slow handler finish
    assert sorted(set(fake.accepted_ids())) == sorted(e["id"] for e in events)
    assert set(fake.duplicates()) <= in_flight
    assert all(count == 2 for count in fake.duplicates().values())
    print(f"in flight at the kill: {len(in_flight)}; received twice: {len(fake.duplicates())}")
    assert received_in_order(fake, events)
    assert "took over 100 unsettled event(s)" in second.text()


def test_shipper_killed_while_backing_off_sends_nothing_twice(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, shippers: Any
) -> None:
    """SIGKILL while a batch waits to be retried (API answering 503): after a restart
    every event arrives exactly once, in order."""
    events = job_events(settings.prefix, jobs=4, per_job=50)
    emit_all(client, settings, events)
    fake.retry_after = ""
    fake.fail_next = [503] * 10_000
    first = shippers("first")
    wait_until(lambda: len(fake.requests) >= 3, 20, "three refused requests")
    first.kill()
    fake.fail_next = []

    shippers("first")

    wait_until(lambda: settled(client, settings), 60, "the outbox to drain")
    assert fake.duplicates() == {}
    assert sorted(fake.accepted_ids()) == sorted(e["id"] for e in events)
    assert received_in_order(fake, events)


def test_sigterm_stops_the_service_cleanly(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, shippers: Any
) -> None:
    """SIGTERM: exit status 0, lifecycle lines logged, lock released, token never logged."""
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=10))
    shipper = shippers("term")
    assert fake.wait_for(10)

    shipper.process.send_signal(signal.SIGTERM)

    assert shipper.process.wait(10) == 0
    log = shipper.text()
    for line in (
        "term: starting:",
        "term: holds the lock",
        "got SIGTERM; stopping",
        "term: stopped: 10 delivered",
    ):
        assert line in log
    assert TOKEN not in log
    assert not client.exists(lock_key(Keys(settings.prefix)))


def test_service_refuses_to_start_without_a_dynatrace_environment(
    settings: Settings, tmp_path: Path
) -> None:
    """No ORBITAL_DT_ENVIRONMENT: exit status 2 with a message naming the setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")}
    env.update(ORBITAL_REDIS_URL=settings.redis_url, ORBITAL_HOME=str(tmp_path))

    result = subprocess.run(
        [sys.executable, str(SERVICE)], env=env, capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 2
    assert "ORBITAL_DT_ENVIRONMENT" in result.stderr
