"""Benchmark: the GitHub webhook receiver against a bare endpoint of the same stack.

Measured with ``wrk`` (Debian's package) on loopback, each scenario for the same
time and with the same connections:

* ``bare``: an aiohttp endpoint in its own process, same server settings, that
  reads the body and answers 200 without any other work (the peer);
* ``ping``: the receiver (``services/webhook.py``) on signed pings, each with its
  own delivery id: size check, HMAC-SHA256 over the body, JSON decode, and one
  Redis SET NX for the delivery id;
* ``pull_request``: signed ``pull_request.opened`` deliveries: the above plus
  routing, a "once" claim and three enqueues (review job, two arch builds);
* ``forged``: pings with a wrong signature (answered 401, no Redis).

It starts its own redis-server (no persistence) on a free loopback port, then the
two servers. Run: ``python bench/bench_webhook.py [--duration 10] [--connections 32]``.
Prints requests/s, p50 and p99 latency per scenario and the ratio to ``bare``, and
the CPU time the server process (all threads) and Redis spent per request, which
stays meaningful on a machine whose other load makes the wall-clock figures vary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from orbital.github.signature import sign  # noqa: E402 - after the checkout is on the path

__all__ = ["main"]

SECRET = "bench-webhook-secret"  # noqa: S105 - the benchmark's own secret
PAYLOADS = ROOT.parent / "shared" / "webhooks"
FLEET = "repos:\n  - {name: hello, repo: Codertocat/Hello-World, status: active}\n"

# One Lua state per wrk thread: each request gets a fresh delivery id, because the
# receiver answers a repeated id as a duplicate without doing the work.
WRK_SCRIPT = r"""
local body = io.open(os.getenv("BENCH_BODY")):read("*a")
local counter = 0
prefix = ""
statuses = {}
local threads = {}

function setup(thread)
  thread:set("prefix", tostring(#threads) .. "-" .. os.getenv("BENCH_RUN"))
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = os.getenv("BENCH_EVENT"),
    ["X-Hub-Signature-256"] = os.getenv("BENCH_SIGNATURE"),
    ["X-GitHub-Delivery"] = "d" .. prefix .. "-" .. counter,
  }
  return wrk.format("POST", "/webhook", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do codes[tostring(code)] = (codes[tostring(code)] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(codes) do table.insert(parts, string.format('"%s": %d', code, n)) end
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"socket_errors": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, table.concat(parts, ", ")))
end
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback http only
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not answer {url} within 30 s")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_s(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        info: dict[str, str] = client.info("cpu")  # type: ignore[assignment]
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


@contextmanager
def _process(argv: list[str], env: dict[str, str], health: str, what: str) -> Iterator[int]:
    # The receiver logs refusals (a line a second during the forged scenario) and any
    # failure; they go to a file so the table stays readable.
    log = open(Path(env["ORBITAL_HOME"]).parent / f"{what.replace(' ', '-')}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        _wait_http(health, process, what)
        yield process.pid
    finally:
        process.terminate()
        process.wait(20)
        log.close()


@contextmanager
def _redis(workdir: Path) -> Iterator[str]:
    port = _free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def serve_bare(port: int) -> None:
    """The peer: an aiohttp endpoint that reads the body and answers 200, nothing else."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/webhook", ok)
    app.router.add_get("/healthz", ok)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)


def run_wrk(port: int, body: Path, event: str, signature: str, args: argparse.Namespace,
            script: Path, run: str) -> dict[str, object]:  # fmt: skip
    """Run wrk against ``port`` and return its JSON summary."""
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_EVENT": event,
           "BENCH_SIGNATURE": signature, "BENCH_RUN": run}  # fmt: skip
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
            "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}/webhook"]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH "))
    result: dict[str, object] = json.loads(line.removeprefix("BENCH "))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--only", nargs="*", default=[], help="scenarios to run (bare first)")
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        serve_bare(args.bare)
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if not PAYLOADS.is_dir():
        raise SystemExit(f"{PAYLOADS} is absent: the benchmark posts the real payloads there")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-webhook-")))
        script = tmp / "webhook.lua"
        script.write_text(WRK_SCRIPT)
        (tmp / "repos.yaml").write_text(FLEET)
        redis_url = stack.enter_context(_redis(tmp))
        bare_port, hook_port = _free_port(), _free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORBITAL_")},
               "ORBITAL_REDIS_URL": redis_url, "ORBITAL_PREFIX": "bench",
               "ORBITAL_HOME": str(tmp / "home"), "ORBITAL_WEBHOOK_SECRET": SECRET,
               "ORBITAL_WEBHOOK_PORT": str(hook_port), "ORBITAL_SECRET_ENV": "",
               "ORBITAL_FLEET_FILE": str(tmp / "repos.yaml"),
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        bare_pid = stack.enter_context(_process(
            [sys.executable, __file__, "--bare", str(bare_port)], env,
            f"http://127.0.0.1:{bare_port}/healthz", "bare endpoint"))  # fmt: skip
        hook_pid = stack.enter_context(_process(
            [sys.executable, str(ROOT / "services" / "webhook.py"), "--log-level", "WARNING"],
            env, f"http://127.0.0.1:{hook_port}/healthz", "webhook receiver"))  # fmt: skip

        ping = PAYLOADS / "ping.payload.json"
        pr = PAYLOADS / "pull_request.opened.payload.json"
        secret = SECRET.encode()
        scenarios = [
            ("bare", bare_pid, bare_port, ping, "ping", sign(secret, ping.read_bytes()), "200"),
            ("ping", hook_pid, hook_port, ping, "ping", sign(secret, ping.read_bytes()), "200"),
            (
                "pull_request",
                hook_pid,
                hook_port,
                pr,
                "pull_request",
                sign(secret, pr.read_bytes()),
                "202",
            ),
            ("forged", hook_pid, hook_port, ping, "ping", sign(b"wrong", ping.read_bytes()), "401"),
        ]
        print(f"== webhook receiver vs bare aiohttp endpoint: wrk -t{args.threads} "
              f"-c{args.connections} -d{args.duration}s on 127.0.0.1, "
              f"{os.cpu_count()} CPU ==")  # fmt: skip
        rows = []
        base = 0.0
        for name, pid, port, body, event, signature, expected in scenarios:
            if args.only and name not in args.only:
                continue
            cpu, redis_cpu = _cpu_s(pid), _redis_cpu_s(redis_url)
            result = run_wrk(port, body, event, signature, args, script, name)
            cpu, redis_cpu = _cpu_s(pid) - cpu, _redis_cpu_s(redis_url) - redis_cpu
            served = max(1, int(result["requests"]))  # type: ignore[call-overload]
            rate = float(result["requests"]) / float(result["seconds"])  # type: ignore[arg-type]
            base = base or rate
            statuses = dict(result["statuses"])  # type: ignore[call-overload]
            unexpected = {k: v for k, v in statuses.items() if k != expected}
            rows.append((name, f"{rate:,.0f}", f"{int(result['p50_us']) / 1000:.2f}",  # type: ignore[call-overload]
                         f"{int(result['p99_us']) / 1000:.2f}",  # type: ignore[call-overload]
                         f"{rate / base:.2f}x", f"{cpu / served * 1e6:.0f}",
                         f"{redis_cpu / served * 1e6:.0f}",
                         f"{expected} x{statuses.get(expected, 0)}",
                         str(unexpected or "-"), str(result["socket_errors"])))  # fmt: skip
        heads = (
            "scenario",
            "req/s",
            "p50 ms",
            "p99 ms",
            "vs bare",
            "server CPU us/req",
            "redis CPU us/req",
            "answers",
            "other",
            "sock err",
        )
        widths = [max(len(str(r[i])) for r in [heads, *rows]) for i in range(len(heads))]
        for row in [heads, *rows]:
            print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
