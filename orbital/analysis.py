"""pandas frames of builds, jobs, workers and nightly runs, for notebooks.

Each function takes records the library already read and returns a frame with
stable column names and proper dtypes (times as UTC timestamps).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from orbital.builds import BuildRecord
from orbital.jobs import Job

__all__ = ["builds_frame", "jobs_frame", "steps_frame", "workers_frame"]

BUILD_COLUMNS = [
    "job_id",
    "repo",
    "branch",
    "arch",
    "type",
    "status",
    "trigger",
    "commit_sha",
    "framework_version",
    "nightly_id",
    "worker",
    "attempts",
    "failed_step",
    "failure_summary",
    "queued_at",
    "started_at",
    "finished_at",
    "queue_wait_s",
    "setup_s",
    "run_s",
    "duration_s",
    "steps",
    "sandbox",
]
JOB_COLUMNS = [
    "id",
    "type",
    "state",
    "repo",
    "branch",
    "arch",
    "queue",
    "trigger",
    "attempts",
    "worker",
    "nightly_id",
    "created_at",
    "enqueued_at",
    "started_at",
    "finished_at",
    "error",
]
WORKER_COLUMNS = [
    "id",
    "arch",
    "host",
    "status",
    "queues",
    "capacity_total",
    "active",
    "active_jobs",
    "sandbox",
    "started_at",
    "last_heartbeat",
]


def _times(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce").where(lambda s: s > 0)
        frame[column] = pd.to_datetime(values, unit="s", utc=True)
    return frame


def builds_frame(records: Iterable[BuildRecord]) -> pd.DataFrame:
    """One row per build; ``steps`` is the number of steps."""
    rows = []
    for r in records:
        row = r.to_dict()
        row["steps"] = len(r.steps)
        row["duration_s"] = round(r.duration_s, 3)
        row["sandbox"] = r.sandbox.get("kind", "")
        rows.append({c: row.get(c) for c in BUILD_COLUMNS})
    frame = pd.DataFrame(rows, columns=BUILD_COLUMNS)
    return _times(frame, ["queued_at", "started_at", "finished_at"])


def steps_frame(records: Iterable[BuildRecord]) -> pd.DataFrame:
    """One row per step of each build (for per-step failure analysis)."""
    rows = [
        {"job_id": r.job_id, "repo": r.repo, "arch": r.arch, **s.to_dict()}
        for r in records
        for s in r.steps
    ]
    return pd.DataFrame(rows)


def jobs_frame(jobs: Iterable[Job]) -> pd.DataFrame:
    """One row per job record."""
    rows = [{c: j.public_dict().get(c) for c in JOB_COLUMNS} for j in jobs]
    frame = pd.DataFrame(rows, columns=JOB_COLUMNS)
    return _times(frame, ["created_at", "enqueued_at", "started_at", "finished_at"])


def workers_frame(registrations: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per registered (live) worker."""
    rows = []
    for reg in registrations:
        row = {c: reg.get(c) for c in WORKER_COLUMNS}
        row["active_jobs"] = json.loads(row["active_jobs"] or "[]")
        row["sandbox"] = json.loads(row["sandbox"] or "{}").get("kind", "")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=WORKER_COLUMNS)
    return _times(frame, ["started_at", "last_heartbeat"])
