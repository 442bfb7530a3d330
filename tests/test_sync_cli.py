"""``orbital sync status`` and ``orbital sync run`` against a real Redis server and
real git repositories (the same fleet as tests/test_sync.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import anyio
import pytest
import redis
from click.testing import CliRunner

from orbital.jobs import JobType
from orbital.keys import Keys
from orbital.settings import Settings
from orbital.sync import run_sync_job
from orbital.sync.cli import sync
from tests.test_agents import run_manager
from tests.test_sync import EXPECTED, fleet_settings  # noqa: F401 - the fixture


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "ORBITAL_REDIS_URL": settings.redis_url,
        "ORBITAL_PREFIX": settings.prefix,
        "ORBITAL_HOME": str(settings.home),
        "ORBITAL_FLEET_FILE": settings.fleet_file,
        "ORBITAL_GIT_URL_TEMPLATE": settings.git_url_template,
        "ORBITAL_FRAMEWORK_REPO": settings.framework_repo,
        "ORBITAL_CONFIG": "",
    }


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def manager(fleet_settings: Settings) -> Iterator[None]:  # noqa: F811
    """A manager worker serving the sync queue in a background thread."""
    stop = threading.Event()

    def serve() -> None:
        anyio.run(lambda: run_manager(fleet_settings, stop.is_set, handlers={JobType.SYNC: run_sync_job},
                                      timeout_s=120))  # fmt: skip

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


def test_status_before_any_check_says_how_to_run_one(
    runner: CliRunner,
    fleet_settings: Settings,  # noqa: F811
    client: redis.Redis,
) -> None:
    """With no results stored, status points at `orbital sync run`."""
    result = runner.invoke(sync, ["status"], env=env_of(fleet_settings))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no drift check has run yet: orbital sync run"


def test_run_here_checks_in_process_and_status_prints_the_table(
    runner: CliRunner,
    fleet_settings: Settings,  # noqa: F811
    client: redis.Redis,
) -> None:
    """`sync run --here` needs no worker; `sync status` then shows one row per
    repository with its status, versions and reason, and --json the same data."""
    ran = runner.invoke(sync, ["run", "--here"], env=env_of(fleet_settings))
    assert ran.exit_code == 0, ran.output
    assert "1 up-to-date, 2 behind, 1 ahead, 4 unknown; target v1.10.0" in ran.output

    shown = runner.invoke(sync, ["status"], env=env_of(fleet_settings))
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split() == [
        "repository",
        "branch",
        "status",
        "current",
        "target",
        "checked",
        "(UTC)",
        "reason",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.startswith("acme/")}
    assert set(rows) == set(EXPECTED)
    assert rows["acme/old"][1:5] == ["main", "behind", "v1.9", "v1.10.0"]
    assert "no .devcontainer directory" in next(
        line for line in lines if line.startswith("acme/nodir")
    )
    assert "last fleet check" in shown.output

    as_json = json.loads(
        runner.invoke(sync, ["status", "--json"], env=env_of(fleet_settings)).output
    )
    statuses = {r["repo"]: r["status"] for r in as_json["results"]}
    assert statuses == {repo: status for repo, (status, _c, _r) in EXPECTED.items()}
    assert as_json["last_check"]["target"] == "v1.10.0"

    events = [json.loads(f[b"e"]) for _, f in client.xrange(Keys(fleet_settings.prefix).outbox)]
    assert len([e for e in events if e["type"] == "sync.drift"]) == len(EXPECTED)


def test_run_queues_a_job_a_manager_worker_runs(
    runner: CliRunner,
    fleet_settings: Settings,  # noqa: F811
    client: redis.Redis,
    manager: None,
) -> None:
    """`sync run` queues a drift job, waits for the manager worker to run it and prints
    the results; `--repo` validates one repository and exits 1 when it drifted."""
    ran = runner.invoke(sync, ["run", "--timeout", "60"], env=env_of(fleet_settings))
    assert ran.exit_code == 0, ran.output
    assert " passed: done" in ran.output
    assert "acme/future" in ran.output

    drifted = runner.invoke(
        sync, ["run", "--repo", "acme/old", "--json"], env=env_of(fleet_settings)
    )
    assert drifted.exit_code == 1
    payload = json.loads(drifted.output)
    assert [r["repo"] for r in payload["results"]] == ["acme/old"]
    assert "failed: acme/old main is behind" in payload["summary"]


def test_run_refuses_a_bad_repository_name(
    runner: CliRunner,
    fleet_settings: Settings,  # noqa: F811
) -> None:
    """A repository name that is not owner/name is refused before anything is queued."""
    result = runner.invoke(
        sync, ["run", "--repo", "acme/x;rm -rf /", "--here"], env=env_of(fleet_settings)
    )
    assert result.exit_code == 2
    assert "invalid repository" in result.output
