"""The worker pool: claim loops, leases, heartbeat, drain, and job handlers."""

from __future__ import annotations

from orbital.workers.pool import Worker, WorkerConfig
from orbital.workers.runner import JobContext, JobHandler, JobResult, run_lab_job

__all__ = ["JobContext", "JobHandler", "JobResult", "Worker", "WorkerConfig", "run_lab_job"]
