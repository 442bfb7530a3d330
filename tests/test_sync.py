"""Framework-version drift against real bare git repositories (read through a
file:// URL template) and a real Redis server: statuses, the target from release
tags, stored results, sync.drift events, the validate action and the scheduler's
hourly drift job."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from orbital.sync import (
    DriftStore,
    compare_versions,
    enqueue_drift_if_due,
    newest_release,
    run_sync_job,
    version_key,
)
from orbital.sync.store import drift_key
from tests.labs import LabFactory
from tests.test_agents import ended, events_of, manager_name, run_manager

FRAMEWORK = "acme/codespaces-framework"
TAGS = ("v1.2.0", "v1.9.0", "v1.10.0", "v2.0.0-rc1", "latest")

LABS: dict[str, dict[str, str]] = {
    "acme/current": {".devcontainer/util/source_framework.sh": "FRAMEWORK_VERSION=1.10.0\n"},
    "acme/old": {".devcontainer/devcontainer.json": '{"image": "shinojosa/dt-enablement:v1.9"}\n'},
    "acme/future": {".devcontainer/util/variables.sh": 'export FRAMEWORK_VERSION="2.1.0"\n'},
    "acme/noversion": {
        ".devcontainer/devcontainer.json": '{"image": "mcr.microsoft.com/devcontainers/base"}\n'
    },
    "acme/nodir": {"README.md": "no dev container here\n"},
    "acme/latest": {".devcontainer/util/source_framework.sh": "FRAMEWORK_VERSION=latest\n"},
    "acme/frozen": {".devcontainer/util/source_framework.sh": "FRAMEWORK_VERSION=1.2.0\n"},
}
EXPECTED = {
    "acme/current": ("up-to-date", "1.10.0", ""),
    "acme/old": ("behind", "v1.9", ""),
    "acme/future": ("ahead", "2.1.0", ""),
    "acme/noversion": ("unknown", "", "no framework version declared"),
    "acme/nodir": ("unknown", "", "branch main has no .devcontainer directory"),
    "acme/latest": ("unknown", "latest", "declared version 'latest' is not a release number"),
    "acme/gone": ("unknown", "", "cannot read branch main"),
    "acme/branchy": ("behind", "1.2.0", ""),
}

pytestmark = pytest.mark.anyio


def tag_framework(labs: LabFactory) -> None:
    labs.make(FRAMEWORK, {"README.md": "framework\n"})
    bare = labs.root / "repos" / f"{FRAMEWORK}.git"
    for tag in TAGS:
        subprocess.run(["git", "tag", tag], cwd=bare, check=True)


def write_fleet(path: Path, repos: dict[str, dict[str, Any]]) -> Path:
    entries = [
        {"name": repo.split("/")[1], "repo": repo, "status": "active", **extra}
        for repo, extra in repos.items()
    ]
    path.write_text(yaml.safe_dump({"repos": entries}))
    return path


@pytest.fixture
def fleet_settings(settings: Settings, labs: LabFactory, tmp_path: Path) -> Settings:
    """Seven labs, one on a branch, one missing, one archived; a tagged framework repo."""
    for repo, files in LABS.items():
        labs.make(repo, files)
    labs.make(
        "acme/branchy",
        {"README.md": "x\n"},
        branches={
            "develop": {".devcontainer/util/source_framework.sh": "FRAMEWORK_VERSION=1.2.0\n"}
        },
    )
    tag_framework(labs)
    repos: dict[str, dict[str, Any]] = {repo: {} for repo in LABS}
    repos["acme/frozen"] = {"status": "archived"}
    repos["acme/gone"] = {}
    repos["acme/branchy"] = {"branch": "develop"}
    fleet = write_fleet(tmp_path / "repos.yaml", repos)
    return dataclasses.replace(
        settings,
        fleet_file=str(fleet),
        git_url_template=labs.template,
        framework_repo=FRAMEWORK,
        sync_concurrency=3,
    )


async def run_sync(settings: Settings, client: redis.Redis, **job_fields: Any) -> Job:
    queue = Queue(client, settings)
    job = Job(type=JobType.SYNC, **job_fields)
    queue.enqueue(job)
    await run_manager(settings, ended(queue, job), handlers={JobType.SYNC: run_sync_job})
    return queue.get_job(job.id)


# versions -------------------------------------------------------------------------------
def test_versions_compare_by_number_with_prereleases_first() -> None:
    """v1.10 is newer than v1.9, a leading v and missing parts do not matter, an rc
    sorts before its release, and only plain v-tags count as releases."""
    assert compare_versions("v1.9", "1.10.0") == -1
    assert compare_versions("v1.2", "1.2.0") == 0
    assert compare_versions("2.0.0-rc1", "2.0.0") == -1
    assert newest_release(TAGS) == "v1.10.0"
    assert newest_release(["latest", "v2.0.0-rc1"]) is None
    assert version_key("main") is None
    with pytest.raises(ValueError, match="'latest' is not a version number"):
        compare_versions("latest", "1.0")


# the drift job -------------------------------------------------------------------------
async def test_drift_job_stores_each_repository_status_and_emits_sync_drift(
    fleet_settings: Settings, client: redis.Redis
) -> None:
    """Every non-archived registry repo gets up-to-date, behind, ahead or unknown with the
    reason, against the newest release tag; results and events land together."""
    job = await run_sync(fleet_settings, client, params={"action": "drift"})
    assert job.state == "passed", job.error

    store = DriftStore(client, Keys(fleet_settings.prefix))
    results = {r.repo: r for r in store.results()}
    assert set(results) == set(EXPECTED)
    for repo, (status, current, reason) in EXPECTED.items():
        result = results[repo]
        assert (result.status, result.current) == (status, current), repo
        assert reason in result.reason, (repo, result.reason)
        assert result.target == "v1.10.0"
        assert result.checked_by == job.id
    assert results["acme/branchy"].branch == "develop"
    assert len(results["acme/current"].commit_sha) == 40

    last = store.last_check()
    assert last["target"] == "v1.10.0"
    assert last["source"] == f"newest release tag of {FRAMEWORK}"
    assert last["counts"] == {"up-to-date": 1, "behind": 2, "ahead": 1, "unknown": 4}

    events = {e["data"]["repository.name"]: e for e in events_of(client, fleet_settings, job)}
    assert set(events) == set(EXPECTED)
    old = events["acme/old"]
    assert old["type"] == "sync.drift"
    assert old["id"] == f"{job.id}.sync.drift.1.acme.old"
    assert old["data"]["current_version"] == "v1.9"
    assert old["data"]["target_version"] == "v1.10.0"
    assert old["data"]["drifted"] is True
    assert old["data"]["framework.version"] == "v1.9"
    assert old["data"]["worker_id"] == manager_name(fleet_settings)
    assert events["acme/current"]["data"]["drifted"] is False
    assert "framework.version" not in events["acme/nodir"]["data"]
    assert not (fleet_settings.work_dir / manager_name(fleet_settings) / job.id).exists()


async def test_configured_target_wins_and_a_smaller_fleet_replaces_the_results(
    fleet_settings: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    """framework_target_version overrides the tags; a later fleet check drops
    repositories that left the registry."""
    await run_sync(fleet_settings, client)
    smaller = write_fleet(tmp_path / "small.yaml", {"acme/current": {}, "acme/old": {}})
    settings = dataclasses.replace(
        fleet_settings, fleet_file=str(smaller), framework_target_version="1.9.0"
    )
    job = await run_sync(settings, client)

    assert job.state == "passed"
    results = {r.repo: r.status for r in DriftStore(client, Keys(settings.prefix)).results()}
    assert results == {"acme/current": "ahead", "acme/old": "up-to-date"}
    assert DriftStore(client, Keys(settings.prefix)).last_check()["source"] == "configured"


async def test_unknown_target_fails_the_job_and_marks_every_repository_unknown(
    fleet_settings: Settings, client: redis.Redis
) -> None:
    """Without a reachable framework repository the job fails and says why; each repo
    still records the version it declares."""
    settings = dataclasses.replace(fleet_settings, framework_repo="acme/no-such-framework")
    job = await run_sync(settings, client)

    assert job.state == "failed"
    assert "target version unknown: git ls-remote of acme/no-such-framework failed" in job.error
    current = DriftStore(client, Keys(settings.prefix)).get("acme/current")
    assert current is not None
    assert current.status == "unknown"
    assert current.current == "1.10.0"
    assert current.reason.startswith("target unknown: git ls-remote")


async def test_validate_passes_an_up_to_date_repo_and_fails_a_behind_one(
    fleet_settings: Settings, client: redis.Redis
) -> None:
    """validate checks the job's own repository and branch and fails when it drifted."""
    good = await run_sync(
        fleet_settings, client, repo="acme/current", params={"action": "validate"}
    )
    bad = await run_sync(fleet_settings, client, repo="acme/old", params={"action": "validate"})

    assert good.state == "passed"
    assert good.framework_version == "1.10.0"
    assert bad.state == "failed"
    assert bad.error == "acme/old main is behind: declares v1.9, target is v1.10.0"
    assert not client.exists(f"{fleet_settings.prefix}:sync:last")
    assert set(client.hkeys(drift_key(Keys(fleet_settings.prefix)))) == {
        b"acme/current",
        b"acme/old",
    }


async def test_bad_sync_params_end_in_error(fleet_settings: Settings, client: redis.Redis) -> None:
    """An unknown action or a validate job without a repository is refused."""
    unknown = await run_sync(fleet_settings, client, params={"action": "upgrade"})
    assert unknown.state == "error"
    assert "'upgrade' is not a sync action" in unknown.error
    bare = await run_sync(fleet_settings, client, params={"action": "validate"})
    assert bare.state == "error"
    assert "a validate job needs a repository" in bare.error


# the scheduler's hourly drift job --------------------------------------------------------
def test_drift_job_is_queued_once_per_slot_and_never_piles_up(
    settings: Settings, client: redis.Redis
) -> None:
    """One job per cron slot however often it is asked; the next slot is skipped while
    the previous job waits; an empty sync_cron disables it."""
    queue = Queue(client, settings)
    slot = 1_800_000_000.0 - 1_800_000_000.0 % 3600
    first = enqueue_drift_if_due(client, settings, queue, now=slot + 10)
    assert first is not None
    assert first.params["action"] == "drift"
    assert first.trigger == "schedule"
    assert enqueue_drift_if_due(client, settings, queue, now=slot + 40) is None
    assert (
        enqueue_drift_if_due(client, settings, queue, now=slot + 3610) is None
    )  # first still queued
    assert queue.depth("sync") == 1

    client.hset(Keys(settings.prefix).job(first.id), "state", "passed")
    second = enqueue_drift_if_due(client, settings, queue, now=slot + 7210)
    assert second is not None
    assert second.id != first.id
    assert (
        enqueue_drift_if_due(
            client, dataclasses.replace(settings, sync_cron=""), queue, now=slot + 20000
        )
        is None
    )


def test_events_for_a_check_outside_a_job_name_the_check(fleet_settings: Settings) -> None:
    """Events of a check run in-process (orbital sync run --here) are about the check."""
    from orbital.sync import DriftReport, DriftResult, Target, drift_events

    report = DriftReport(
        Target("v1.0.0", "configured"),
        (DriftResult("acme/a", "main", "behind", "0.9", "v1.0.0"),),
        1.0e9,
        "s123",
    )
    [event] = drift_events("pfx", report)
    assert event["id"] == "s123.sync.drift.acme.a"
    assert event["subject"] == "s123"
    assert event["source"] == "orbital/pfx"
    assert json.dumps(event["data"], sort_keys=True) == json.dumps(
        {
            "branch": "main",
            "current_version": "0.9",
            "drifted": True,
            "framework.version": "0.9",
            "repository.name": "acme/a",
            "status": "behind",
            "target.source": "configured",
            "target_version": "v1.0.0",
        },
        sort_keys=True,
    )
