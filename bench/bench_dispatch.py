"""Dispatch throughput: no-op jobs through enqueue, claim and complete.

Orbital, arq and RQ (its non-forking ``SimpleWorker``) each get the same private
Redis server, flushed between runs. Each system runs in a fresh child process
that first enqueues all N jobs (timed on its own), then drains them with one
worker in that process (timed from the worker's start until the last job is
recorded as complete):

* Orbital: ``Queue.enqueue`` of ``agent`` jobs one call at a time, then one
  :class:`orbital.workers.pool.Worker` with capacity 10 on the ``agent`` queue
  and a handler that returns ``passed`` at once. Complete = the job is in the
  ended index (its finish script ran).
* arq: ``ArqRedis.enqueue_job`` one at a time, then ``arq.worker.Worker`` with
  ``max_jobs=10`` (arq's default) in burst mode and ``poll_delay=0``. arq's
  shipped ``poll_delay=0.5`` reads at most 100 ids per poll and sleeps out the
  rest of the half second (about 200 jobs/s at most), which would flatter
  Orbital; ``--systems orbital,arq,arq-default`` adds that run too. The target
  is judged against the faster arq.
* RQ: ``Queue.enqueue`` one at a time, then ``SimpleWorker.work(burst=True)``,
  which runs one job at a time in its own process (RQ has no in-process
  concurrency).

Logging is left unconfigured in every child, so no library pays for writing
per-job log lines.

Run: ``python bench/bench_dispatch.py`` (N=20,000), ``--n 5000``, ``--rounds 3`` or
``--quick`` (N=2,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import redis
from _common import (
    NullSandboxProvider,
    arq_noop,
    banner,
    fmt_ratio,
    noop_handler,
    private_redis,
    redis_cpu_s,
    rq_noop,
    run_child,
    table,
)

from orbital.connection import async_client, sync_client
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings, host_arch
from orbital.workers.pool import Worker, WorkerConfig
from orbital.workers.runner import JobContext, JobResult

__all__ = ["main"]

CAPACITY = 10  # Orbital's slots on the agent queue, matching arq's default max_jobs.
SYSTEMS = ("orbital", "arq", "arq-default", "rq")
DEFAULT_SYSTEMS = ("orbital", "arq", "rq")
LABELS = {
    "orbital": "orbital (capacity 10)",
    "arq": "arq (max_jobs 10, poll_delay 0)",
    "arq-default": "arq (max_jobs 10, poll_delay 0.5)",
    "rq": "rq SimpleWorker (1 at a time)",
}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# children: each runs one system end to end and prints one JSON line ------------
def _orbital_settings(url: str) -> Settings:
    # No-op handlers write no logs or work files, so the home is never created.
    home = Path(tempfile.gettempdir()) / f"orbital-bench-home-{os.getpid()}"
    return Settings(redis_url=url, prefix="bench", home=home)


def orbital_enqueue(settings: Settings, n: int) -> float:
    """Enqueue ``n`` agent jobs one call at a time; return the seconds it took."""
    queue = Queue(sync_client(settings.redis_url), settings)
    started = time.perf_counter()
    for _ in range(n):
        queue.enqueue(Job(type=JobType.AGENT, trigger="bench"))
    elapsed = time.perf_counter() - started
    queue.client.close()
    return elapsed


def orbital_drain(settings: Settings, n: int) -> tuple[float, int]:
    """Run one Orbital worker until ``n`` jobs have ended; return (seconds, ended)."""
    handled = 0
    all_handled = anyio.Event()

    async def handler(ctx: JobContext) -> JobResult:
        nonlocal handled
        handled += 1
        if handled == n:
            all_handled.set()
        return await noop_handler(ctx)

    async def drain() -> tuple[float, int]:
        config = WorkerConfig(
            arch=host_arch(), capacity={"agent": CAPACITY}, handlers={JobType.AGENT: handler}
        )
        worker = Worker(settings, config, NullSandboxProvider(), redis_url=settings.redis_url)
        probe = async_client(settings.redis_url)
        ended_key = Keys(settings.prefix).jobs_ended
        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(worker.run, handle_signals=False))
            await all_handled.wait()
            while (ended := int(await probe.zcard(ended_key))) < n:
                await anyio.sleep(0.002)
            drain_s = time.perf_counter() - began
            worker.drain()
        await probe.aclose()
        return drain_s, ended

    return anyio.run(drain)


def child_orbital(url: str, n: int) -> dict[str, Any]:
    """Enqueue ``n`` agent jobs, then drain them with one Orbital worker."""
    settings = _orbital_settings(url)
    enqueue_s = orbital_enqueue(settings, n)
    cpu0 = _cpu_s()
    drain_s, completed = orbital_drain(settings, n)
    return {
        "enqueue_s": enqueue_s,
        "drain_s": drain_s,
        "completed": completed,
        "worker_cpu_s": _cpu_s() - cpu0,
    }


def child_arq(url: str, n: int, poll_delay_s: float) -> dict[str, Any]:
    """Enqueue ``n`` no-op jobs with arq, then drain them with one burst-mode worker."""
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker as ArqWorker
    from arq.worker import func

    redis_settings = RedisSettings.from_dsn(url)

    async def run() -> dict[str, Any]:
        pool = await create_pool(redis_settings)
        started = time.perf_counter()
        for _ in range(n):
            await pool.enqueue_job("arq_noop")
        enqueue_s = time.perf_counter() - started

        worker = ArqWorker(
            functions=[func(arq_noop, name="arq_noop")],
            redis_settings=redis_settings,
            burst=True,
            max_jobs=CAPACITY,
            poll_delay=poll_delay_s,
            handle_signals=False,
        )
        cpu0 = _cpu_s()
        began = time.perf_counter()
        await worker.main()
        drain_s = time.perf_counter() - began
        cpu = _cpu_s() - cpu0
        completed = worker.jobs_complete
        await worker.close()
        await pool.aclose()
        return {
            "enqueue_s": enqueue_s,
            "drain_s": drain_s,
            "completed": completed,
            "worker_cpu_s": cpu,
        }

    return asyncio.run(run())


def child_rq(url: str, n: int) -> dict[str, Any]:
    """Enqueue ``n`` no-op jobs with RQ, then drain them with one SimpleWorker."""
    import rq

    conn = redis.Redis.from_url(url)
    queue = rq.Queue("bench", connection=conn)
    started = time.perf_counter()
    for _ in range(n):
        queue.enqueue(rq_noop)
    enqueue_s = time.perf_counter() - started

    worker = rq.SimpleWorker([queue], connection=conn)
    cpu0 = _cpu_s()
    began = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    drain_s = time.perf_counter() - began
    cpu = _cpu_s() - cpu0
    completed = queue.finished_job_registry.count
    return {"enqueue_s": enqueue_s, "drain_s": drain_s, "completed": completed, "worker_cpu_s": cpu}


def run_system(system: str, url: str, n: int) -> dict[str, Any]:
    if system == "orbital":
        return child_orbital(url, n)
    if system == "arq":
        return child_arq(url, n, 0.0)
    if system == "arq-default":
        return child_arq(url, n, 0.5)
    if system == "rq":
        return child_rq(url, n)
    raise SystemExit(f"--child: unknown system {system!r}; one of {', '.join(SYSTEMS)}")


# parent ------------------------------------------------------------------------
def _measure(system: str, url: str, n: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushall()
    cpu0 = redis_cpu_s(client)
    result = run_child(__file__, ["--child", system, "--url", url, "--n", str(n)])
    result["redis_cpu_s"] = redis_cpu_s(client) - cpu0
    client.close()
    if result["completed"] != n:
        raise RuntimeError(f"{system}: {result['completed']} of {n} jobs completed, not {n}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with the hidden ``--child``, one system's run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=20_000, help="jobs per system and round")
    parser.add_argument("--quick", action="store_true", help="N=2000, one round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds; the median round of each system is shown",
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_system(args.child, args.url, args.n)))
        return 0

    n, rounds = (2000, 1) if args.quick else (args.n, args.rounds)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with private_redis() as server:
        print(
            banner(
                f"dispatch: {n:,} no-op jobs: enqueue all, then drain with one worker "
                f"process; {rounds} round(s)",
                server,
            ),
            flush=True,
        )
        load_before = os.getloadavg()[0]
        for round_no in range(rounds):
            order = systems if round_no % 2 == 0 else systems[::-1]
            for system in order:
                r = _measure(system, server.url, n)
                runs[system].append(r)
                print(
                    f"  round {round_no + 1} {system}: enqueue {r['enqueue_s']:.2f} s, "
                    f"drain {r['drain_s']:.2f} s",
                    flush=True,
                )
        print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(report({s: _median_run(r) for s, r in runs.items()}, n))
    return 0


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median drain time (a real run, so its figures agree)."""
    return sorted(runs, key=lambda r: float(r["drain_s"]))[(len(runs) - 1) // 2]


def report(results: dict[str, dict[str, Any]], n: int) -> str:
    """The results table and Orbital's ratios against the peers of the same run."""
    rows = []
    for system, r in results.items():
        rows.append(
            (
                LABELS[system],
                f"{n / r['enqueue_s']:,.0f}",
                f"{n / r['drain_s']:,.0f}",
                f"{r['worker_cpu_s'] / n * 1e6:,.0f}",
                f"{r['redis_cpu_s'] / n * 1e6:,.0f}",
            )
        )
    headers = ("system", "enqueue/s", "drain jobs/s", "worker CPU us/job", "redis CPU us/job")
    lines = [table(headers, rows)]
    if "orbital" not in results:
        return "\n".join(lines)

    orbital = results["orbital"]
    lines += ["", "peer time / orbital time, same run (>1: orbital is faster or cheaper):"]
    for peer in (s for s in results if s != "orbital"):
        p = results[peer]
        lines.append(
            f"  vs {LABELS[peer]}: drain {fmt_ratio(p['drain_s'], orbital['drain_s'])}, "
            f"enqueue {fmt_ratio(p['enqueue_s'], orbital['enqueue_s'])}, "
            f"worker CPU/job {fmt_ratio(p['worker_cpu_s'], orbital['worker_cpu_s'])}"
        )
    if "arq" in results:
        best = min(results[s]["drain_s"] for s in ("arq", "arq-default") if s in results)
        verdict = "met" if orbital["drain_s"] <= best else "NOT met"
        lines.append(
            f"target: orbital drain jobs/s >= arq's best: {verdict} "
            f"({fmt_ratio(best, orbital['drain_s'])})"
        )
    else:
        lines.append("target not judged: it needs the arq run with poll_delay 0 (--systems arq)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
