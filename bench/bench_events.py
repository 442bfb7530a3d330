"""Benchmark: outbox write rate and shipper throughput, each against a peer in the same run.

* Outbox writes: ``emit()`` (build a job event, validate, encode, XADD) against a
  bare XADD loop of a pre-encoded event of the same size; both one round trip per
  event, then both pipelined 100 per round trip. Also the queue's own path: a
  cancel of a queued job, whose Lua script changes the state and writes the
  ``build.cancelled`` event in one step.
* Shipping: the shipper draining a full outbox to the local Dynatrace fake
  against a bare loop POSTing the same batches to the same fake over one kept-alive
  connection, with no Redis at all.

It starts its own redis-server (no persistence) on a free loopback port and the
fake on another. Run: ``python bench/bench_events.py [--events N] [--ship N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orbital.events import (  # noqa: E402
    BATCH_CONTENT_TYPE,
    Outbox,
    Shipper,
    emit,
    encode,
    job_event,
)
from orbital.jobs import Job, JobType  # noqa: E402
from orbital.keys import Keys  # noqa: E402
from orbital.queue import Queue  # noqa: E402
from orbital.settings import Settings  # noqa: E402
from tests.dynatrace_fake import job_events, outbox_settled  # noqa: E402

__all__ = ["main"]

TOKEN = "dt0c01.BENCHTOKEN.0123456789"  # noqa: S105 - the fake's token


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-events-")
    proc = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def rate(count: int, func: Callable[[], None]) -> float:
    """Run ``func`` (which does ``count`` units) and return units per second."""
    started = time.perf_counter()
    func()
    return count / (time.perf_counter() - started)


def sample_job() -> Job:
    return Job(
        type=JobType.INTEGRATION_TEST,
        repo="acme/lab-business-events",
        branch="main",
        arch="amd64",
        commit="0123abc",
        trigger="nightly",
        worker="worker-amd64-1",
        attempts=1,
        framework_version="v1.2.3",
        nightly_id="n-20240501",
    )


def bench_outbox(
    client: redis.Redis, settings: Settings, count: int, rounds: int
) -> list[tuple[str, float]]:
    keys = Keys(settings.prefix)
    job = sample_job()
    extra = {
        "status": "failed",
        "passed": False,
        "duration_s": 412.5,
        "failed_step": "app-deployed",
        "failure_summary": "deployment did not become ready in 300 s",
        "isolation": "sysbox",
    }
    payload = encode(job_event(settings.prefix, "build.completed", job, extra, now=time.time()))
    raw_key = f"{settings.prefix}:bench:raw"

    def raw_loop() -> None:
        for _ in range(count):
            client.xadd(raw_key, {"e": payload})

    def emit_loop() -> None:
        for i in range(count):
            emit(
                client,
                keys,
                job_event(
                    settings.prefix, "build.completed", job, extra, now=time.time(), suffix=f".{i}"
                ),
            )

    def raw_pipelined() -> None:
        for start in range(0, count, 100):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(100, count - start)):
                pipe.xadd(raw_key, {"e": payload})
            pipe.execute()

    def emit_pipelined() -> None:
        for start in range(0, count, 100):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(start + 100, count)):
                event = job_event(
                    settings.prefix, "build.completed", job, extra, now=time.time(), suffix=f".{i}"
                )
                pipe.xadd(keys.outbox, {"e": encode(event)})
            pipe.execute()

    queue = Queue(client, settings)
    transitions = max(100, count // 5)
    jobs = [Job(type=JobType.AGENT, params={"n": i}) for i in range(transitions)]
    for j in jobs:
        queue.enqueue(j)

    def cancel_loop() -> None:
        for j in jobs:
            queue.cancel(j.id, "bench")

    variants: list[tuple[str, int, Callable[[], None]]] = [
        ("raw XADD, one per round trip", count, raw_loop),
        ("emit(), one per round trip", count, emit_loop),
        ("raw XADD, pipelined x100", count, raw_pipelined),
        ("emit() encoding, pipelined x100", count, emit_pipelined),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _n, _f in variants}
    for _ in range(rounds):
        for name, units, func in variants:
            samples[name].append(rate(units, func))
            client.delete(raw_key, keys.outbox)
    results = [(name, statistics.median(values)) for name, values in samples.items()]
    results.append(("queue cancel (Lua state change + event)", rate(transitions, cancel_loop)))
    client.delete(raw_key)
    return results


@contextmanager
def fake_process() -> Iterator[int]:
    """The ingest fake in its own process (no GIL shared with the shipper); yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.dynatrace_fake", "--token", TOKEN],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    port = int(proc.stdout.readline().split()[1])
    try:
        yield port
    finally:
        proc.stdin.close()
        proc.wait(10)


def fake_stats(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/_fake/stats")
    stats: dict[str, int] = json.loads(conn.getresponse().read())
    conn.close()
    return stats


def fill_outbox(client: redis.Redis, keys: Keys, bodies: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for body in bodies:
        pipe.xadd(keys.outbox, {"e": body})
    pipe.execute()
    Outbox(client, keys, "bench").ensure_group()


def ship_once(client: redis.Redis, settings: Settings, count: int) -> float:
    """Events/s of one shipper draining ``count`` events already in the outbox."""
    keys = Keys(settings.prefix)
    shipper = Shipper(settings)
    thread = threading.Thread(target=shipper.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    while not outbox_settled(client, keys):
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    shipper.stop()
    thread.join(10)
    assert shipper.stats.delivered == count, shipper.stats
    return count / elapsed


def post_once(port: int, bodies: list[bytes], batch: int) -> float:
    """Events/s of a bare loop POSTing the same batches over one kept-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Api-Token {TOKEN}", "Content-Type": BATCH_CONTENT_TYPE}
    started = time.perf_counter()
    for start in range(0, len(bodies), batch):
        body = b"[" + b",".join(bodies[start : start + batch]) + b"]"
        conn.request("POST", "/api/v2/bizevents/ingest", body, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 202, response.status
    elapsed = time.perf_counter() - started
    conn.close()
    return len(bodies) / elapsed


def bench_shipping(
    client: redis.Redis, settings: Settings, count: int, batch: int, rounds: int
) -> list[tuple[str, float]]:
    keys = Keys(settings.prefix)
    client.delete(keys.outbox)  # the queue benchmark's events
    events = job_events(settings.prefix, jobs=50, per_job=max(1, count // 50))
    bodies = [encode(e).encode() for e in events]
    shipped: list[float] = []
    bare: list[float] = []
    with fake_process() as port:
        ship_settings = dataclasses.replace(
            settings,
            dt_environment=f"http://127.0.0.1:{port}",
            dt_api_token=TOKEN,
            shipper_batch_size=batch,
            shipper_poll_s=0.05,
            shipper_name="bench",
        )
        for _ in range(rounds):
            bare.append(post_once(port, bodies, batch))
            fill_outbox(client, keys, bodies)
            shipped.append(ship_once(client, ship_settings, len(bodies)))
        stats = fake_stats(port)
    assert stats["accepted"] == 2 * rounds * len(bodies), stats
    return [
        ("bare POST loop, no Redis", statistics.median(bare)),
        ("shipper (outbox -> ingest -> XACK+XDEL)", statistics.median(shipped)),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks and print events/s with ratios against their peers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000, help="outbox writes per variant")
    parser.add_argument("--ship", type=int, default=50_000, help="events the shipper drains")
    parser.add_argument("--batch", type=int, default=500, help="events per ingest request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (median)")
    args = parser.parse_args(argv)

    with redis_server() as url:
        client = redis.Redis.from_url(url)
        settings = Settings(redis_url=url, prefix="bench", home=Path(tempfile.mkdtemp()))
        outbox = bench_outbox(client, settings, args.events, args.rounds)
        shipping = bench_shipping(client, settings, args.ship, args.batch, args.rounds)
        client.close()

    print(
        f"\nOutbox writes ({args.events} events per variant, median of {args.rounds} rounds, "
        "loopback Redis, no persistence)"
    )
    print(f"  {'variant':44} {'events/s':>10} {'vs raw':>8}")
    baselines = {
        0: outbox[0][1],
        1: outbox[0][1],
        2: outbox[2][1],
        3: outbox[2][1],
        4: outbox[0][1],
    }
    for index, (name, value) in enumerate(outbox):
        print(f"  {name:44} {value:10.0f} {value / baselines[index]:8.2f}")

    print(
        f"\nShipping ({args.ship} events, batches of {args.batch}, median of {args.rounds} "
        "rounds, ingest fake in its own process)"
    )
    print(f"  {'variant':44} {'events/s':>10} {'vs bare':>8}")
    for name, value in shipping:
        print(f"  {name:44} {value:10.0f} {value / shipping[0][1]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
