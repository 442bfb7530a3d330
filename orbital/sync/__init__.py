"""Framework-version drift across the fleet: the sync job, its results and CLI.

Register the handler on a worker that serves the ``sync`` queue::

    from orbital.sync import run_sync_job
    WorkerConfig(..., handlers={JobType.SYNC: run_sync_job})

and the command group on the CLI: ``main.add_command(orbital.sync.cli.sync)``.
"""

from __future__ import annotations

from orbital.sync.drift import (
    AHEAD,
    BEHIND,
    STATUSES,
    UNKNOWN,
    UP_TO_DATE,
    DriftReport,
    DriftResult,
    RepoRef,
    Target,
    check_drift,
    classify,
    fleet_refs,
    resolve_target,
)
from orbital.sync.handler import SYNC_ACTIONS, repos_to_check, run_sync_job
from orbital.sync.schedule import enqueue_drift_if_due
from orbital.sync.store import DriftStore, drift_events, save_report
from orbital.sync.versions import compare_versions, newest_release, version_key

__all__ = [
    "AHEAD",
    "BEHIND",
    "STATUSES",
    "SYNC_ACTIONS",
    "UNKNOWN",
    "UP_TO_DATE",
    "DriftReport",
    "DriftResult",
    "DriftStore",
    "RepoRef",
    "Target",
    "check_drift",
    "classify",
    "compare_versions",
    "drift_events",
    "enqueue_drift_if_due",
    "fleet_refs",
    "newest_release",
    "repos_to_check",
    "resolve_target",
    "run_sync_job",
    "save_report",
    "version_key",
]
