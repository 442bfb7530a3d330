"""``orbital demo``: a small sample fleet, one nightly run, results and triage.

The sample labs are real git repositories created on the fly under
``<home>/demo/repos`` in the layout real labs use (``.devcontainer/`` with BATS
unit tests, post-create/post-start scripts and an integration script whose
assertion wrapper appends to ``$RESULT_JSON``). Two pass, one fails an
integration assertion, one fails a BATS test, and one is archived (so it is
not in the nightly fan-out).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import redis

from orbital.client import Orbital
from orbital.connection import async_client, resolve_redis_url, sync_client
from orbital.fleet import load_fleet
from orbital.sandboxes.base import SandboxProvider
from orbital.sandboxes.select import make_provider
from orbital.scheduler import NightlyRun
from orbital.settings import Settings, host_arch
from orbital.workers import Worker, WorkerConfig

__all__ = ["DemoResult", "create_sample_fleet", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_PREFIX = "orbital-demo"
OWNER = "orbital-demo"

_ASSERT_LIB = r"""# The lab's assertion wrapper: one JSON line per assertion in $RESULT_JSON.
now() { date +%s.%N; }
assert_that() {
  local step="$1" description="$2"; shift 2
  local started finished status error=""
  started=$(now)
  if "$@" > /tmp/orbital-assert.$$ 2>&1; then status=pass; else
    status=fail; error="$(tr -d '"\\' < /tmp/orbital-assert.$$ | tr '\n' ' ' | cut -c1-300)"
  fi
  finished=$(now)
  printf '{"step":"%s","description":"%s","status":"%s","started_at":%s,"finished_at":%s,"duration_s":%s,"error":"%s"}\n' \
    "$step" "$description" "$status" "$started" "$finished" \
    "$(awk "BEGIN{print $finished-$started}")" "$error" >> "$RESULT_JSON"
  [ "$status" = pass ]
}
"""

_PASSING_BATS = """#!/usr/bin/env bats
@test "greeting script exists" {
  [ -f .devcontainer/post-create.sh ]
}
@test "arithmetic still works" {
  [ $((6 * 7)) -eq 42 ]
}
"""

_FAILING_BATS = """#!/usr/bin/env bats
@test "config file is valid" {
  [ -f .devcontainer/post-create.sh ]
}
@test "required variable DT_ENDPOINT is documented" {
  grep -q DT_ENDPOINT README.md
}
"""


@dataclass(frozen=True)
class _Lab:
    name: str
    arch: str | None
    status: str
    bats: str | None
    integration: str


_LABS = (
    _Lab(
        "lab-kubernetes-101",
        None,
        "active",
        _PASSING_BATS,
        'assert_that cluster-up "the demo cluster answers" test -f "$HOME/cluster.ready"\n'
        'assert_that app-deployed "the sample app is deployed" true\n',
    ),
    _Lab(
        "lab-otel-basics",
        "amd64",
        "active",
        None,
        'assert_that collector "the collector config parses" grep -q receivers .devcontainer/otel.yaml\n'
        'assert_that traces "traces reach the backend" true\n',
    ),
    _Lab(
        "lab-business-events",
        None,
        "active",
        None,
        'assert_that bizevents-ingest "bizevents are accepted" true\n'
        'assert_that frontend-http "frontend answers HTTP 200" sh -c \'echo "expected HTTP 200 from frontend, got 503"; exit 1\'\n',
    ),
    _Lab("lab-log-ingest", None, "active", _FAILING_BATS, 'assert_that logs "logs arrive" true\n'),
    _Lab("lab-retired", None, "archived", None, 'assert_that old "old lab" true\n'),
)


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Orbital Demo", "-c", "user.email=demo@orbital.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _write_lab(work: Path, lab: _Lab) -> None:
    dev = work / ".devcontainer"
    (dev / "test" / "unit").mkdir(parents=True)
    (dev / "util").mkdir()
    (work / "README.md").write_text(f"# {lab.name}\n\nA sample lab of the Orbital demo.\n")
    (dev / "util" / "source_framework.sh").write_text('FRAMEWORK_VERSION="1.2.0"\n')
    (dev / "otel.yaml").write_text("receivers:\n  otlp: {}\n")
    (dev / "post-create.sh").write_text(
        'echo "post-create: installing tools"\necho ok > "$HOME/tools.ready"\n'
    )
    (dev / "post-start.sh").write_text(
        'echo "post-start: starting the demo cluster"\ntouch "$HOME/cluster.ready"\n'
    )
    (dev / "test" / "assert.sh").write_text(_ASSERT_LIB)
    (dev / "test" / "integration.sh").write_text(
        '#!/usr/bin/env bash\nset -u\nsource "$(dirname "$0")/assert.sh"\nfailed=0\n'
        + "".join(f"{line} || failed=1\n" for line in lab.integration.strip().splitlines())
        + "exit $failed\n"
    )
    if lab.bats:
        (dev / "test" / "unit" / "basics.bats").write_text(lab.bats)


def create_sample_fleet(root: Path) -> Path:
    """Create the sample labs as bare git repositories under ``root`` and return
    the path of their ``repos.yaml``. Existing content under ``root`` is replaced."""
    repos = root / "repos"
    subprocess.run(["rm", "-rf", "--", str(root)], check=True)
    repos.mkdir(parents=True)
    entries = []
    for lab in _LABS:
        work = root / "src" / lab.name
        work.mkdir(parents=True)
        _write_lab(work, lab)
        _git("init", "--quiet", "--initial-branch=main", ".", cwd=work)
        _git("add", "-A", cwd=work)
        _git("commit", "--quiet", "-m", "Initial lab", cwd=work)
        bare = repos / OWNER / f"{lab.name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        _git("clone", "--quiet", "--bare", str(work), str(bare), cwd=root)
        arch = f"\n    arch: {lab.arch}" if lab.arch else ""
        entries.append(
            f"  - name: {lab.name}\n    repo: {OWNER}/{lab.name}\n    status: {lab.status}{arch}\n"
            f'    tags: [demo]\n    duration: "30m"\n'
        )
    fleet_file = root / "repos.yaml"
    fleet_file.write_text("repos:\n" + "\n".join(entries))
    return fleet_file


@dataclass
class DemoResult:
    """The demo's nightly run and where its fleet lives."""

    run: NightlyRun
    fleet_file: Path
    sandbox: str
    settings: Settings
    client: redis.Redis


async def _run_worker_until(worker: Worker, done: Callable[[], bool]) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker.run(handle_signals=False))
        while not done():
            await anyio.sleep(0.2)
        worker.drain()


def run_demo(
    settings: Settings,
    provider_factory: Callable[[Settings, str], SandboxProvider] | None = None,
    progress: Callable[[str], None] = print,
    timeout_s: float = 600.0,
) -> DemoResult:
    """Create the sample fleet, plan one nightly run, and run it with an
    in-process worker serving both arch queues. Returns when every job ended."""
    root = settings.home / "demo"
    fleet_file = create_sample_fleet(root)
    settings = Settings(
        **{
            **settings.__dict__,
            "prefix": DEMO_PREFIX,
            "fleet_file": str(fleet_file),
            "nightly_stagger_s": 0.0,
            "git_url_template": f"file://{root / 'repos'}/{{repo}}.git",
        }
    )
    url = resolve_redis_url(settings)
    client = sync_client(url)
    for key in client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000):
        client.delete(key)

    orbital = Orbital(settings, client)
    fleet = load_fleet(fleet_file)
    run = orbital.nightly(fleet=fleet)
    progress(
        f"nightly {run.run_id}: {run.total} jobs for {len(fleet.eligible())} eligible labs "
        f"({len(fleet.entries)} in the registry)"
    )

    worker_id = f"demo-{host_arch()}"
    provider = (provider_factory or _local_provider)(settings, worker_id)
    config = WorkerConfig(
        arch=host_arch(), capacity={"test:amd64": 2, "test:arm64": 2}, name=worker_id
    )
    worker = Worker(settings, config, provider, client=async_client(url))
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s

    def done() -> bool:
        for record in orbital.history.recent(100):
            if record.job_id not in seen and record.nightly_id == run.run_id:
                seen.add(record.job_id)
                detail = f" at {record.failed_step}" if record.failed_step else ""
                progress(
                    f"[{len(seen)}/{run.total}] {record.repo} {record.arch}: {record.status}{detail} "
                    f"({record.duration_s:.1f} s)"
                )
        return orbital.nightly_run(run.run_id).finished or time.monotonic() > deadline

    anyio.run(_run_worker_until, worker, done)
    return DemoResult(orbital.nightly_run(run.run_id), fleet_file, provider.kind, settings, client)


def _local_provider(settings: Settings, worker_id: str) -> SandboxProvider:
    return make_provider(settings, "local", worker_id)
