"""Helpers shared by the benchmarks: a private Redis server, child processes,
percentiles, and the no-op jobs every queue runs.

The benchmarks measure the ``orbital`` package of the checkout they sit in (the
parent of ``bench/``), not whichever copy happens to be installed;
``ORBITAL_BENCH_SOURCE`` names another directory holding an ``orbital`` package
(a scratch copy with a candidate fix, say) to measure that instead.

Each benchmark starts its own ``redis-server`` (Debian's ``/usr/bin/redis-server``
unless ``ORBITAL_BENCH_REDIS_SERVER`` names another) on a free loopback port with
persistence off, so nothing else on the machine is touched and every figure in
one run is measured against the same server.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

SOURCE = Path(os.environ.get("ORBITAL_BENCH_SOURCE") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(SOURCE))

from orbital.jobs import Job  # noqa: E402 - after the source directory is on the path
from orbital.sandboxes.base import Sandbox, SandboxProvider  # noqa: E402
from orbital.workers.runner import JobContext, JobResult  # noqa: E402

__all__ = [
    "BenchRedis",
    "NullSandboxProvider",
    "arq_noop",
    "banner",
    "fmt_ratio",
    "noop_handler",
    "percentile",
    "private_redis",
    "redis_cpu_s",
    "redis_info",
    "rq_noop",
    "run_child",
    "source_description",
    "table",
]

REDIS_SERVER = os.environ.get("ORBITAL_BENCH_REDIS_SERVER", "/usr/bin/redis-server")
_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchRedis:
    """A redis-server process owned by one benchmark run (loopback, no persistence)."""

    def __init__(self, executable: str = REDIS_SERVER) -> None:
        if not os.access(executable, os.X_OK):
            raise SystemExit(
                f"redis-server not found at {executable}: apt-get install redis-server, "
                "or set ORBITAL_BENCH_REDIS_SERVER to a redis-server binary"
            )
        self.executable = executable
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="orbital-bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: if it does not answer within ten seconds.
        """
        argv = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
            "--maxmemory-policy",
            "noeviction",
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server {self.executable} did not answer on port {self.port}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def version(self) -> str:
        client = redis.Redis.from_url(self.url)
        try:
            return str(_info(client, "server")["redis_version"])
        finally:
            client.close()


@contextmanager
def private_redis() -> Iterator[BenchRedis]:
    """Run a private Redis server for the duration of the block."""
    server = BenchRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return cast(dict[str, Any], client.info(section))


def redis_info(client: redis.Redis, section: str) -> dict[str, Any]:
    """One section of INFO as a dict."""
    return _info(client, section)


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds (user + system) the Redis server has used so far."""
    info = _info(client, "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_child(script: str, args: Sequence[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``python <script> <args>`` and return the JSON object on its last stdout line.

    Raises:
        RuntimeError: if the child fails or prints no JSON, with its stderr tail.
    """
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout_s
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark child {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt_ratio(value: float, base: float) -> str:
    """``value / base`` as ``1.23x`` (``n/a`` when the base is zero)."""
    return f"{value / base:.2f}x" if base else "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (first column left-aligned, the others right)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(parts)

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def banner(title: str, server: BenchRedis) -> str:
    """The heading every benchmark prints: what, when, on which machine and server."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"== {title} ==\n"
        f"{stamp}; {os.cpu_count()} CPU ({cpu}); Python {platform.python_version()}; "
        f"redis-server {server.version()} on 127.0.0.1:{server.port} (private, no persistence)\n"
        f"orbital measured: {source_description()}"
    )


def source_description() -> str:
    """Where the measured ``orbital`` package lives, with its git commit when known."""
    import orbital

    where = Path(orbital.__path__[0]).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "log", "-1", "--format=%h"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "orbital"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    if not commit:
        return str(where)
    return f"{where} (commit {commit}{', with uncommitted changes in orbital/' if dirty else ''})"


# no-op jobs -------------------------------------------------------------------
async def noop_handler(ctx: JobContext) -> JobResult:
    """Orbital handler that does nothing and passes."""
    return JobResult("passed")


async def arq_noop(ctx: dict[str, Any]) -> None:
    """arq job function that does nothing."""


def rq_noop() -> None:
    """RQ job function that does nothing (imported by the worker as ``_common.rq_noop``)."""


class NullSandboxProvider(SandboxProvider):
    """A provider for workers that only run no-op handlers: it hands out no sandbox."""

    kind = "none"
    isolation = "none"

    def acquire(self, job: Job) -> AbstractAsyncContextManager[Sandbox]:
        raise RuntimeError(f"job {job.id}: the benchmark's worker has no sandbox to lend")
