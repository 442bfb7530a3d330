"""Runbook agent jobs: papermill executes a real notebook (tests/runbooks/check.ipynb)
on a real kernel, and the job's result is papermill's exit status."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import redis

from orbital.agents import find_runbook
from orbital.errors import JobParamsError
from orbital.keys import Keys
from orbital.logs import read_log
from orbital.queue import Queue
from orbital.settings import Settings
from tests.test_agents import agent_job, ended, events_of, run_manager

RUNBOOKS = Path(__file__).resolve().parent / "runbooks"

pytestmark = pytest.mark.anyio


@pytest.fixture
def runbook_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, runbooks_dir=str(RUNBOOKS), agent_timeout_s=120.0)


async def test_runbook_success_passes_with_parameters_and_keeps_the_notebook(
    runbook_settings: Settings, client: redis.Redis
) -> None:
    """A clean run passes; parameters reach the notebook; the executed copy is kept."""
    queue = Queue(client, runbook_settings)
    job = agent_job(action="scaffold", runbook="check.ipynb", parameters={"message": "from-test"})
    queue.enqueue(job)
    await run_manager(runbook_settings, ended(queue, job), timeout_s=120)

    stored = queue.get_job(job.id)
    assert stored.state == "passed", stored.error
    log = read_log(client, Keys(runbook_settings.prefix), job.id).decode()
    assert f"runbook for acme/lab main job {job.id}: mode=ok message=from-test" in log
    assert "runbook finished" in log
    [event] = events_of(client, runbook_settings, job)
    assert event["type"] == "agent.scaffold"
    assert event["data"]["success"] is True
    assert event["data"]["mode"] == "runbook"
    executed = json.loads(Path(event["data"]["runbook.output"]).read_text())
    assert executed["metadata"]["papermill"]["parameters"]["message"] == "from-test"


async def test_failing_cell_fails_the_job(runbook_settings: Settings, client: redis.Redis) -> None:
    """A cell that raises fails the job, and the summary names the error."""
    queue = Queue(client, runbook_settings)
    job = agent_job(action="scaffold", runbook="check.ipynb", parameters={"mode": "fail"})
    queue.enqueue(job)
    await run_manager(runbook_settings, ended(queue, job), timeout_s=120)

    stored = queue.get_job(job.id)
    assert stored.state == "failed"
    assert "runbook check.ipynb failed: python" in stored.error
    assert "runbook check failed on purpose" in stored.error
    [event] = events_of(client, runbook_settings, job)
    assert event["data"]["success"] is False


async def test_killed_kernel_fails_the_job_even_though_the_notebook_looks_fine(
    runbook_settings: Settings, client: redis.Redis
) -> None:
    """A kernel killed mid-run fails the job by papermill's exit status, although the
    saved notebook records no error output."""
    queue = Queue(client, runbook_settings)
    job = agent_job(action="scaffold", runbook="check.ipynb", parameters={"mode": "kill"})
    queue.enqueue(job)
    await run_manager(runbook_settings, ended(queue, job), timeout_s=120)

    stored = queue.get_job(job.id)
    assert stored.state == "failed"
    assert "exited with code" in stored.error
    [event] = events_of(client, runbook_settings, job)
    executed = json.loads(Path(event["data"]["runbook.output"]).read_text())
    outputs = [o for cell in executed["cells"] for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


async def test_configured_runbook_action_runs_the_notebook(
    settings: Settings, client: redis.Redis
) -> None:
    """agent_runbooks maps an action to a runbook; diagnose still waits for repeated failures."""
    configured = dataclasses.replace(
        settings,
        runbooks_dir=str(RUNBOOKS),
        agent_runbooks=("triage=check.ipynb",),
        diagnose_min_failures=1,
    )
    queue = Queue(client, configured)
    job = agent_job(action="triage")
    queue.enqueue(job)
    await run_manager(configured, ended(queue, job), timeout_s=120)

    stored = queue.get_job(job.id)
    assert stored.state == "passed", stored.error
    [event] = events_of(client, configured, job)
    assert event["type"] == "agent.triage"
    assert event["data"]["runbook"] == "check.ipynb"


def test_runbook_must_be_a_notebook_in_the_runbooks_directory(settings: Settings) -> None:
    """Only notebooks that exist in runbooks_dir are found; others are refused by name."""
    configured = dataclasses.replace(settings, runbooks_dir=str(RUNBOOKS))
    assert find_runbook(configured, "check.ipynb") == RUNBOOKS / "check.ipynb"
    with pytest.raises(JobParamsError, match=r"'missing\.ipynb' is not in"):
        find_runbook(configured, "missing.ipynb")
