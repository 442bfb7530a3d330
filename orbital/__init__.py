"""Orbital keeps a fleet of lab repositories healthy.

The public surface for scripts and notebooks::

    import orbital
    o = orbital.connect()      # embedded Redis when ORBITAL_REDIS_URL is not set
"""

from __future__ import annotations

from orbital.builds import BuildHistory, BuildRecord, TriageEntry
from orbital.client import Orbital, connect
from orbital.errors import (
    ConfigError,
    FleetError,
    InvalidIdentifierError,
    JobError,
    JobStateError,
    LeaseLostError,
    LogError,
    LogExpiredError,
    OrbitalError,
    SandboxError,
    UnknownJobError,
    UnknownLogError,
)
from orbital.fleet import Fleet, RepoEntry, load_fleet
from orbital.jobs import Job, JobState, JobType
from orbital.queue import CancelResult, EnqueueResult
from orbital.results import Step, StepStatus
from orbital.scheduler import NightlyRun
from orbital.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BuildHistory",
    "BuildRecord",
    "CancelResult",
    "ConfigError",
    "EnqueueResult",
    "Fleet",
    "FleetError",
    "InvalidIdentifierError",
    "Job",
    "JobError",
    "JobState",
    "JobStateError",
    "JobType",
    "LeaseLostError",
    "LogError",
    "LogExpiredError",
    "NightlyRun",
    "Orbital",
    "OrbitalError",
    "RepoEntry",
    "SandboxError",
    "Settings",
    "Step",
    "StepStatus",
    "TriageEntry",
    "UnknownJobError",
    "UnknownLogError",
    "connect",
    "load_fleet",
]
