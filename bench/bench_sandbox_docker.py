"""The Docker sandbox's warm pool: job start, step overhead and reset, on a real engine.

Three measurements, each against a peer measured in the same run:

* **job start**: from the claim (``provider.acquire``) to the first output of the
  first step in the lab container, with a warm slot; versus a cold start (outer
  container, inner daemon, lab image streamed in, then the same lab start and
  step). Targets: warm under 1 s, cold at least 10x slower.
* **step overhead**: a trivial step (``true``) through ``Sandbox.run`` versus a raw
  ``docker exec`` of the same command into the same lab container with the Docker
  CLI; also shown against the SDK's bare exec create/start/inspect. Target: the
  sandbox within 1.5x of ``docker exec``.
* **reset**: returning a slot after a job that started containers, volumes and a
  network inside it and wrote files, until it is ready again; versus rebuilding the
  slot from scratch. Target: under 3 s.

Needs the engine and images of ``.ci/docker/`` (``ORBITAL_TEST_DOCKER_HOST``, default
``unix:///run/orbital-test-docker.sock``). Slots run in nested-docker mode.

Run: ``python bench/bench_sandbox_docker.py`` (or ``--quick`` for fewer rounds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
from _common import fmt_ratio, percentile, source_description, table

from orbital.jobs import Job, JobType
from orbital.sandboxes.docker import DockerSandbox, DockerSandboxProvider
from orbital.sandboxes.docker_engine import LAB_NAME
from orbital.settings import Settings

HOST = os.environ.get("ORBITAL_TEST_DOCKER_HOST", "unix:///run/orbital-test-docker.sock")
DOCKER_CLI = (
    "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
)

# What a k3d-style job leaves in its slot: containers with volumes, a volume, a network.
_JOB_LITTER = """set -e
api() { curl -sf --unix-socket /var/run/docker.sock -H 'Content-Type: application/json' "$@"; }
for n in 1 2; do
  api -d '{"Image":"orbital-test/lab:latest","Cmd":["sleep","600"],
    "HostConfig":{"Binds":["data'$n':/data"]}}' "http://d/containers/create?name=box$n" >/dev/null
  api -X POST "http://d/containers/box$n/start"
done
api -d '{"Name":"cache"}' http://d/volumes/create >/dev/null
api -d '{"Name":"labnet"}' http://d/networks/create >/dev/null
mkdir -p /workspaces/lab/build && head -c 20000000 /dev/urandom > /workspaces/lab/build/blob
"""


def settings(home: Path) -> Settings:
    token = uuid.uuid4().hex[:8]
    return Settings(
        prefix=f"bench{token}",
        home=home,
        docker_host=HOST,
        docker_isolation="nested-docker",
        docker_outer_image="orbital-test/outer:latest",
        docker_lab_image="orbital-test/lab:latest",
        docker_memory="1g",
        docker_cpus=1.0,
        docker_port_base=33000 + int(token[:3], 16) % 500 * 4,
        docker_slot_dir=f"/run/orbital-bench-slots/{token}",
        docker_health_interval_s=60.0,
    )


async def close(provider: DockerSandboxProvider) -> None:
    await provider.close()
    shutil.rmtree(provider.config.slot_dir, ignore_errors=True)


def job() -> Job:
    return Job(type=JobType.INTEGRATION_TEST, repo="bench/lab", arch="amd64")


async def first_output_s(provider: DockerSandboxProvider, started: float) -> float:
    """Acquire a slot and run ``echo started``; seconds from ``started`` to its output."""
    seen: list[float] = []

    async def mark(_chunk: bytes) -> None:
        if not seen:
            seen.append(time.monotonic())

    async with provider.acquire(job()) as sandbox:
        await sandbox.run(
            ["echo", "started"], env={}, cwd="/workspaces", timeout_s=30, on_output=mark
        )
    return seen[0] - started


async def wait_ready(provider: DockerSandboxProvider) -> float:
    started = time.monotonic()
    while not all(s["state"] == "ready" for s in provider.describe()["slots"]):
        await anyio.sleep(0.01)
    return time.monotonic() - started


async def bench_start(home: Path, rounds: int, cold_rounds: int) -> tuple[list[float], list[float]]:
    warm: list[float] = []
    provider = DockerSandboxProvider(settings(home), "bench-warm")
    await provider.open(1)
    try:
        for _ in range(rounds):
            await wait_ready(provider)
            warm.append(await first_output_s(provider, time.monotonic()))
        await wait_ready(provider)
    finally:
        await close(provider)

    cold: list[float] = []
    for i in range(cold_rounds):
        provider = DockerSandboxProvider(settings(home), f"bench-cold{i}")
        started = time.monotonic()
        await provider.open(1)
        try:
            cold.append(await first_output_s(provider, started))
            await wait_ready(provider)
        finally:
            await close(provider)
    return warm, cold


async def bench_steps(home: Path, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"sandbox": [], "docker exec (CLI)": [], "SDK exec": []}
    provider = DockerSandboxProvider(settings(home), "bench-step")
    await provider.open(1)

    async def ignore(_chunk: bytes) -> None:
        return None

    try:
        async with provider.acquire(job()) as sandbox:
            assert isinstance(sandbox, DockerSandbox)
            inner = sandbox.slot.client()
            cli = [DOCKER_CLI, "-H", f"unix://{sandbox.slot.socket_path}", "exec", LAB_NAME, "true"]

            def sdk_exec() -> None:
                created = inner.exec_create(LAB_NAME, ["true"])
                inner.exec_start(created["Id"])
                inner.exec_inspect(created["Id"])

            for _ in range(3):  # warm every path once
                await sandbox.run(
                    ["true"], env={}, cwd="/workspaces", timeout_s=30, on_output=ignore
                )
                subprocess.run(cli, check=True)
            for _ in range(rounds):
                t = time.monotonic()
                result = await sandbox.run(
                    ["true"], env={}, cwd="/workspaces", timeout_s=30, on_output=ignore
                )
                times["sandbox"].append(time.monotonic() - t)
                assert result.exit_code == 0
                t = time.monotonic()
                subprocess.run(cli, check=True)
                times["docker exec (CLI)"].append(time.monotonic() - t)
                t = time.monotonic()
                await anyio.to_thread.run_sync(sdk_exec)
                times["SDK exec"].append(time.monotonic() - t)
    finally:
        await close(provider)
    return times


async def bench_reset(home: Path, rounds: int) -> tuple[list[float], float]:
    resets: list[float] = []
    provider = DockerSandboxProvider(settings(home), "bench-reset")
    await provider.open(1)

    async def ignore(_chunk: bytes) -> None:
        return None

    try:
        for _ in range(rounds):
            await wait_ready(provider)
            async with provider.acquire(job()) as sandbox:
                result = await sandbox.run(
                    ["bash", "-c", _JOB_LITTER],
                    env={},
                    cwd="/workspaces",
                    timeout_s=120,
                    on_output=ignore,
                )
                assert result.exit_code == 0, result
            resets.append(await wait_ready(provider))

        async with provider.acquire(job()) as sandbox:
            assert isinstance(sandbox, DockerSandbox)
            sandbox.needs_rebuild = "benchmark: measure a rebuild"
        rebuild = await wait_ready(provider)
    finally:
        await close(provider)
    return resets, rebuild


def stats(values: list[float]) -> list[str]:
    return [
        f"{statistics.median(values) * 1000:.0f}",
        f"{percentile(values, 90) * 1000:.0f}",
        f"{min(values) * 1000:.0f}",
        str(len(values)),
    ]


async def main(quick: bool) -> int:
    rounds = 5 if quick else 10
    print(f"== Docker sandbox: warm pool ==\n{source_description()}; engine {HOST}\n")
    with tempfile.TemporaryDirectory(prefix="orbital-bench-") as tmp:
        home = Path(tmp)
        warm, cold = await bench_start(home, rounds, 1 if quick else 2)
        steps = await bench_steps(home, 10 if quick else 30)
        resets, rebuild = await bench_reset(home, 3 if quick else 5)

    warm_m, cold_m = statistics.median(warm), statistics.median(cold)
    step_m = {k: statistics.median(v) for k, v in steps.items()}
    reset_m = statistics.median(resets)
    headers = ["measurement", "median ms", "p90 ms", "min ms", "n"]
    print(
        table(
            headers,
            [
                ["job start, warm slot", *stats(warm)],
                ["job start, cold slot", *stats(cold)],
                ["trivial step, sandbox", *stats(steps["sandbox"])],
                ["trivial step, docker exec", *stats(steps["docker exec (CLI)"])],
                ["trivial step, SDK exec", *stats(steps["SDK exec"])],
                ["reset after a busy job", *stats(resets)],
                ["rebuild of the slot", *stats([rebuild])],
            ],
        )
    )
    checks: list[tuple[str, str, bool]] = [
        ("warm start", f"{warm_m:.3f} s (target < 1 s)", warm_m < 1.0),
        (
            "cold / warm start",
            f"{fmt_ratio(cold_m, warm_m)} (target >= 10x)",
            cold_m >= 10 * warm_m,
        ),
        (
            "sandbox / docker exec",
            f"{fmt_ratio(step_m['sandbox'], step_m['docker exec (CLI)'])} (target <= 1.5x)",
            step_m["sandbox"] <= 1.5 * step_m["docker exec (CLI)"],
        ),
        ("sandbox / SDK exec", fmt_ratio(step_m["sandbox"], step_m["SDK exec"]), True),
        (
            "reset",
            f"{reset_m:.2f} s (target < 3 s); rebuild / reset {fmt_ratio(rebuild, reset_m)}",
            reset_m < 3.0,
        ),
    ]
    print()
    for name, text, ok in checks:
        print(f"{name:24} {text}{'' if ok else '   <-- MISSED'}")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    sys.exit(anyio.run(main, args.quick))
