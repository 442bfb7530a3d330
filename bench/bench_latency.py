"""Latency: from enqueue to the start of the job's handler when a slot is free.

Two child processes wait on the same private Redis server:

* an Orbital worker (capacity 10 on the ``agent`` queue) whose handler notes
  ``time.time()`` as its first act and pushes it to an acknowledgement list;
* the baseline: a bare redis-py client blocked in ``BLMOVE`` on a plain list,
  noting ``time.time()`` as soon as the command returns.

The parent sends one job at a time and waits for its acknowledgement before
sending the next, so a slot is always free. Orbital's latency is measured from
just before ``Queue.enqueue`` is called (the job object is built beforehand)
to the handler's first line; the baseline's from just before ``LPUSH`` to
``BLMOVE`` returning. Both clocks are ``time.time()`` on the same host. The
two are interleaved in blocks of 50 so a change in machine load hits both.

Run: ``python bench/bench_latency.py`` (1,000 jobs each), ``--jobs N`` or ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import anyio
import redis
from _common import NullSandboxProvider, banner, fmt_ratio, percentile, private_redis, table

from orbital.connection import sync_client
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings, host_arch
from orbital.workers.pool import Worker, WorkerConfig
from orbital.workers.runner import JobContext, JobResult

__all__ = ["main"]

PREFIX = "benchlat"
CAPACITY = 10
BLOCK = 50
WARMUP = 30
BASE_QUEUE = "benchlat:raw:queue"
BASE_CLAIMED = "benchlat:raw:claimed"
ORBITAL_ACK = "benchlat:ack:orbital"
BASE_ACK = "benchlat:ack:raw"
_ACK_TIMEOUT_S = 10


def _settings(url: str) -> Settings:
    # No-op handlers write no logs or work files, so the home is never created.
    home = Path(tempfile.gettempdir()) / f"orbital-bench-home-{os.getpid()}"
    return Settings(redis_url=url, prefix=PREFIX, home=home)


# children ----------------------------------------------------------------------
def child_worker(url: str) -> None:
    """Run one Orbital worker whose no-op handler acknowledges its start time."""

    async def handler(ctx: JobContext) -> JobResult:
        started = time.time()
        await ctx.client.rpush(ORBITAL_ACK, f"{ctx.job.id} {started!r}")  # type: ignore[misc]
        return JobResult("passed")

    config = WorkerConfig(
        arch=host_arch(), capacity={"agent": CAPACITY}, handlers={JobType.AGENT: handler}
    )
    worker = Worker(_settings(url), config, NullSandboxProvider(), redis_url=url)
    anyio.run(worker.run)


def child_baseline(url: str) -> None:
    """Move ids from a plain list with BLMOVE and acknowledge each one's arrival time."""
    client = redis.Redis.from_url(url)
    while True:
        item = client.blmove(BASE_QUEUE, BASE_CLAIMED, 0, "RIGHT", "LEFT")
        arrived = time.time()
        client.rpush(BASE_ACK, b"%s %r" % (item, arrived))


# parent ------------------------------------------------------------------------
class _Probe:
    """Sends one job at a time and collects start latencies in milliseconds."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.queue = Queue(sync_client(url), _settings(url))
        self.orbital_ms: list[float] = []
        self.enqueue_call_ms: list[float] = []
        self.baseline_ms: list[float] = []

    def _ack(self, key: str, expected: str) -> float:
        reply = cast(list[bytes] | None, self.client.blpop([key], timeout=_ACK_TIMEOUT_S))
        if reply is None:
            raise RuntimeError(f"no acknowledgement on {key} within {_ACK_TIMEOUT_S} s")
        ident, stamp = reply[1].decode().split(" ")
        if ident != expected:
            raise RuntimeError(f"acknowledgement on {key} for {ident}, expected {expected}")
        return float(stamp)

    def orbital(self, record: bool) -> None:
        job = Job(type=JobType.AGENT, trigger="bench")
        sent = time.time()
        self.queue.enqueue(job)
        returned = time.time()
        started = self._ack(ORBITAL_ACK, job.id)
        if record:
            self.orbital_ms.append((started - sent) * 1000)
            self.enqueue_call_ms.append((returned - sent) * 1000)

    def baseline(self, record: bool, seq: int) -> None:
        ident = f"raw-{seq}"
        sent = time.time()
        self.client.lpush(BASE_QUEUE, ident)
        arrived = self._ack(BASE_ACK, ident)
        if record:
            self.baseline_ms.append((arrived - sent) * 1000)

    def wait_for_worker(self, timeout_s: float = 30.0) -> None:
        keys = Keys(PREFIX)
        deadline = time.monotonic() + timeout_s
        while not self.client.smembers(keys.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Orbital worker did not register within {timeout_s} s")
            time.sleep(0.05)


def _spawn(role: str, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--child", role, "--url", url])


def measure(url: str, jobs: int) -> _Probe:
    """Interleave Orbital and baseline blocks until each has ``jobs`` samples."""
    children = [_spawn("worker", url), _spawn("baseline", url)]
    try:
        probe = _Probe(url)
        probe.wait_for_worker()
        for seq in range(WARMUP):
            probe.orbital(record=False)
            probe.baseline(record=False, seq=seq)
        seq = WARMUP
        while len(probe.orbital_ms) < jobs:
            for _ in range(min(BLOCK, jobs - len(probe.orbital_ms))):
                probe.orbital(record=True)
            for _ in range(min(BLOCK, jobs - len(probe.baseline_ms))):
                probe.baseline(record=True, seq=seq)
                seq += 1
        return probe
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def report(probe: _Probe) -> str:
    """Percentiles of both series and Orbital's ratio to the baseline."""

    def row(name: str, values: list[float]) -> tuple[str, ...]:
        stats = [percentile(values, p) for p in (50, 90, 99)] + [max(values)]
        return (name, str(len(values)), *(f"{v:.2f}" for v in stats))

    rows = [
        row("orbital: enqueue -> handler start", probe.orbital_ms),
        row("  of which the enqueue call", probe.enqueue_call_ms),
        row("baseline: LPUSH -> BLMOVE returns", probe.baseline_ms),
    ]
    o50, o99 = percentile(probe.orbital_ms, 50), percentile(probe.orbital_ms, 99)
    b50, b99 = percentile(probe.baseline_ms, 50), percentile(probe.baseline_ms, 99)
    lines = [
        table(("ms", "n", "p50", "p90", "p99", "max"), rows),
        "",
        f"orbital / baseline (same run): p50 {fmt_ratio(o50, b50)}, p99 {fmt_ratio(o99, b99)}",
        f"target p50 < 5 ms: {'met' if o50 < 5 else 'NOT met'} ({o50:.2f} ms); "
        f"p99 < 50 ms: {'met' if o99 < 50 else 'NOT met'} ({o99:.2f} ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the latency comparison (or, with the hidden ``--child``, one waiting side)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=1000, help="samples per series")
    parser.add_argument("--quick", action="store_true", help="200 samples per series")
    parser.add_argument("--child", choices=("worker", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "worker":
        child_worker(args.url)
        return 0
    if args.child == "baseline":
        child_baseline(args.url)
        return 0

    jobs = 200 if args.quick else args.jobs
    with private_redis() as server:
        print(banner(f"latency: {jobs} sequential jobs, a free slot each time", server))
        load_before = os.getloadavg()[0]
        probe = measure(server.url, jobs)
        print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(report(probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
