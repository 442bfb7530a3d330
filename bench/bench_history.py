"""History: the last 50 builds of one repository among 3k, 10k and 100k stored builds.

Build records are written through Orbital's own index function: a Lua script
made of ``queue/lua/prelude.lua`` (the same prelude every queue script runs)
and a short body that calls ``index_build`` for a batch of records, each with
its own end time. So every record lands in exactly the keys and indexes the
worker's finish script writes (record string, all/repo/passed/triple sorted
sets, triage), without running 100,000 jobs through the queue.

Records look like real ones: 10 steps (clone, BATS tests, post-create,
post-start, result.jsonl assertions), about 2 KB of JSON, spread over 30
repositories on two arches, about one in six failing. History grows in time
order, so each stage adds newer builds to the ones already stored.

At each total the benchmark times ``BuildHistory.for_repo(repo, 50)`` (read the
index, fetch the records, parse them into ``BuildRecord`` objects) and, as the
baseline of the same run, the bare Redis reads behind it (ZREVRANGEBYSCORE and
MGET of the same 50 keys, no parsing).

Run: ``python bench/bench_history.py`` (3k, 10k, 100k) or ``--quick`` (3k, 10k).
The smallest total still gives the probed repository more than 50 builds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from importlib import resources
from typing import Any, cast

import redis
from _common import banner, fmt_ratio, percentile, private_redis, redis_info, table

from orbital.builds import BuildHistory, BuildRecord
from orbital.ids import new_job_id
from orbital.keys import Keys
from orbital.queue.scripts import clock_args
from orbital.results import Step, StepStatus

__all__ = ["main"]

PREFIX = "benchhist"
REPOS = [f"dynatrace-wwse/enablement-lab-{i:02d}" for i in range(1, 31)]
PROBE_REPO = REPOS[0]
LIMIT = 50
QUERIES = 300
BATCH = 500
GAP_S = 60.0  # builds end a minute apart: 100,000 builds span about ten weeks
RNG_SEED = 20261204

# The body run after prelude.lua. ARGV[4..] are triples of (end time, job JSON,
# build JSON); NOW is prelude's clock, set per record so each build keeps its time.
INDEX_BODY = """
local stored = 0
for i = 4, #ARGV, 3 do
  NOW = tonumber(ARGV[i])
  local j = cjson.decode(ARGV[i + 1])
  if index_build(j, j.status, ARGV[i + 2]) then stored = stored + 1 end
end
return stored
"""


def _steps(failing: bool) -> list[dict[str, Any]]:
    names = [
        ("clone", "pipeline", "clone the repository at the branch"),
        ("bats:unit/setup.bats:installs the framework", "bats", ""),
        ("bats:unit/setup.bats:writes the devcontainer env", "bats", ""),
        ("bats:unit/functions.bats:deployApp waits for pods", "bats", ""),
        ("post-create", "pipeline", ".devcontainer/post-create.sh"),
        ("post-start", "pipeline", ".devcontainer/post-start.sh"),
        ("assert_k8s_ready", "result.jsonl", "the k3d cluster answers and all nodes are Ready"),
        (
            "assert_app_deployed",
            "result.jsonl",
            "astroshop pods are Running in namespace astroshop",
        ),
        ("assert_operator_ready", "result.jsonl", "the Dynatrace operator reports Ready"),
        ("assert_ingress", "result.jsonl", "the app answers on the published port with HTTP 200"),
    ]
    steps = []
    for index, (name, source, description) in enumerate(names):
        status = StepStatus.FAILED if failing and index == 7 else StepStatus.PASSED
        error = "pods not Running after 300 s: 3 in CrashLoopBackOff" if status != "passed" else ""
        steps.append(
            Step(name, status, 12.5 + index, 0.0, 0.0, error, description, source).to_dict()
        )
    return steps


def _template() -> dict[str, Any]:
    record = BuildRecord(
        job_id="",
        type="integration-test",
        repo="",
        branch="main",
        arch="amd64",
        status="passed",
        trigger="nightly",
        commit="",
        commit_sha="0" * 40,
        framework_version="1.2.3",
        nightly_id="n20261204",
        worker="bench-amd64-000000",
        attempts=1,
        steps=[],
        log_path="/var/lib/orbital/logs/j.log",
        sandbox={"kind": "docker", "isolation": "sysbox"},
        queue_wait_s=2.0,
        setup_s=95.0,
        run_s=610.0,
    )
    return record.to_dict()


class Generator:
    """Makes realistic build records in time order."""

    def __init__(self) -> None:
        self.rng = random.Random(RNG_SEED)
        self.base = _template()
        self.passing_steps = _steps(False)
        self.failing_steps = _steps(True)
        self.count = 0
        self.start = time.time() - 200_000 * GAP_S

    def batch(self, size: int) -> list[str]:
        """ARGV tail for one index call: (end time, job JSON, build JSON) per record."""
        argv: list[str] = []
        for _ in range(size):
            finished = self.start + self.count * GAP_S
            self.count += 1
            roll = self.rng.random()
            status = "passed" if roll < 0.83 else ("failed" if roll < 0.97 else "timed_out")
            repo = REPOS[self.rng.randrange(len(REPOS))]
            arch = "arm64" if self.rng.random() < 0.45 else "amd64"
            job_id = new_job_id()
            record = dict(self.base)
            record.update(
                job_id=job_id,
                repo=repo,
                arch=arch,
                status=status,
                commit_sha=f"{self.rng.getrandbits(160):040x}",
                queued_at=finished - 707.0,
                started_at=finished - 705.0,
                finished_at=finished,
                steps=self.passing_steps if status == "passed" else self.failing_steps,
            )
            if status != "passed":
                record["failed_step"] = "assert_app_deployed"
                record["failure_summary"] = self.failing_steps[7]["error"]
            job = {
                "id": job_id,
                "type": "integration-test",
                "repo": repo,
                "branch": "main",
                "arch": arch,
                "status": status,
            }
            argv += [repr(finished), json.dumps(job), json.dumps(record)]
        return argv


def store(client: redis.Redis, generator: Generator, count: int) -> float:
    """Index ``count`` more records through prelude.lua's index_build; return seconds."""
    prelude = (resources.files("orbital.queue") / "lua" / "prelude.lua").read_text()
    script = client.register_script(prelude + "\n" + INDEX_BODY)
    began = time.perf_counter()
    remaining = count
    while remaining:
        size = min(BATCH, remaining)
        stored = script(keys=[], args=clock_args(PREFIX, time.time()) + generator.batch(size))
        if int(stored) != size:
            raise RuntimeError(f"index_build stored {stored} of {size} records")
        remaining -= size
    return time.perf_counter() - began


def _timed(func: Any, queries: int) -> list[float]:
    for _ in range(10):
        func()
    samples = []
    for _ in range(queries):
        began = time.perf_counter()
        func()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def measure(client: redis.Redis, queries: int) -> dict[str, Any]:
    """Time for_repo and the bare reads behind it on the probe repository."""
    keys = Keys(PREFIX)
    history = BuildHistory(client, keys)
    builds = history.for_repo(PROBE_REPO, LIMIT)
    ends = [b.finished_at for b in builds]
    top = cast(
        list[tuple[bytes, float]],
        client.zrevrange(keys.builds_repo(PROBE_REPO), 0, 0, withscores=True),
    )
    newest = top[0][1]
    if len(builds) != LIMIT or {b.repo for b in builds} != {PROBE_REPO}:
        raise RuntimeError(f"for_repo returned {len(builds)} builds of {PROBE_REPO}: wrong set")
    if ends != sorted(ends, reverse=True) or ends[0] != newest:
        raise RuntimeError("for_repo did not return the newest builds first")

    def bare() -> None:
        ids = client.zrevrangebyscore(keys.builds_repo(PROBE_REPO), "+inf", "-inf", 0, LIMIT)
        client.mget([keys.build(i.decode()) for i in ids])

    # Interleave the two so a change in machine load hits both.
    orbital: list[float] = []
    baseline: list[float] = []
    for _ in range(queries // 50):
        orbital += _timed(lambda: history.for_repo(PROBE_REPO, LIMIT), 50)
        baseline += _timed(bare, 50)
    memory = redis_info(client, "memory")["used_memory"]
    return {
        "total": history.count(),
        "repo_total": client.zcard(keys.builds_repo(PROBE_REPO)),
        "orbital": orbital,
        "baseline": baseline,
        "memory_mb": memory / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    """Fill the history in stages and time the per-repository query at each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="stop at 10k builds")
    parser.add_argument("--queries", type=int, default=QUERIES, help="timed queries per total")
    args = parser.parse_args(argv)
    totals = [3_000, 10_000] if args.quick else [3_000, 10_000, 100_000]

    rows = []
    results = []
    with private_redis() as server:
        print(
            banner(f"history: last {LIMIT} builds of one repo, {len(REPOS)} repos", server),
            flush=True,
        )
        load_before = os.getloadavg()[0]
        client = redis.Redis.from_url(server.url)
        generator = Generator()
        for total in totals:
            took = store(client, generator, total - generator.count)
            result = measure(client, args.queries)
            results.append(result)
            o, b = result["orbital"], result["baseline"]
            rows.append(
                (
                    f"{result['total']:,}",
                    f"{result['repo_total']:,}",
                    f"{sum(o) / len(o):.2f}",
                    f"{percentile(o, 50):.2f}",
                    f"{percentile(o, 99):.2f}",
                    f"{sum(b) / len(b):.2f}",
                    f"{percentile(b, 99):.2f}",
                    fmt_ratio(sum(o), sum(b)),
                    f"{result['memory_mb']:.0f}",
                )
            )
            print(f"  stored up to {total:,} in {took:.1f} s", flush=True)
        client.close()
        print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")

    headers = (
        "builds",
        "of repo",
        "mean ms",
        "p50",
        "p99",
        "bare mean",
        "bare p99",
        "for_repo/bare",
        "redis MB",
    )
    print(table(headers, rows))
    first, last = results[0]["orbital"], results[-1]["orbital"]
    growth = (sum(last) / len(last)) / (sum(first) / len(first))
    worst_mean = max(sum(r["orbital"]) / len(r["orbital"]) for r in results)
    worst_p99 = max(percentile(r["orbital"], 99) for r in results)
    print(
        f"\nmean at {results[-1]['total']:,} / mean at {results[0]['total']:,}: {growth:.2f}x "
        f"(1.00x = no growth with the total)"
    )
    print(
        f"target < 20 ms: mean {'met' if worst_mean < 20 else 'NOT met'} "
        f"(worst {worst_mean:.2f} ms); p99 {'met' if worst_p99 < 20 else 'NOT met'} "
        f"(worst {worst_p99:.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
