"""The job model: what a job is, the states it moves through, and how it is stored.

A job is stored in Redis as a hash of strings; :meth:`Job.to_mapping` and
:meth:`Job.from_mapping` are the only translation between the two.

States::

    scheduled ─due─> queued ─claim─> running ─> passed | failed | error | timed_out
        │              │                │
        │              │                └─ cancel ─> cancelled
        └─ busy triple ┴─> deferred ─ replaced ─> superseded
    running, worker died ─> queued (attempt + 1) ─ too many ─> lost

Terminal states are final: no script overwrites them.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from orbital.ids import (
    new_job_id,
    validate_arch,
    validate_branch,
    validate_commit,
    validate_job_id,
    validate_repo,
)
from orbital.keys import triple as make_triple

__all__ = ["TERMINAL_STATES", "Job", "JobState", "JobType", "queue_for"]


class JobType(enum.StrEnum):
    """What a job does."""

    INTEGRATION_TEST = "integration-test"  # clone, stage 1 (BATS), stage 2
    UNIT_TEST = "unit-test"  # clone and stage 1 only
    DAEMON = "daemon"  # set-up, then stay up until cancelled
    AGENT = "agent"  # an agent CLI session or a runbook (agents issue)
    SYNC = "sync"  # framework-version drift checks (sync issue)

    @property
    def is_lab(self) -> bool:
        """Lab jobs run in a sandbox on an arch queue and hold a triple lock."""
        return self in (JobType.INTEGRATION_TEST, JobType.UNIT_TEST, JobType.DAEMON)


class JobState(enum.StrEnum):
    SCHEDULED = "scheduled"
    DEFERRED = "deferred"
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    LOST = "lost"


TERMINAL_STATES = frozenset(
    {
        JobState.PASSED,
        JobState.FAILED,
        JobState.ERROR,
        JobState.TIMED_OUT,
        JobState.CANCELLED,
        JobState.SUPERSEDED,
        JobState.LOST,
    }
)


def queue_for(job_type: JobType, arch: str | None) -> str:
    """Return the queue a job of this type and arch waits in."""
    if job_type.is_lab:
        return f"test:{arch}"
    return job_type.value


@dataclass
class Job:
    """One unit of work.

    ``params`` holds type-specific parameters (JSON-serialisable). ``token`` is
    the fencing token of the current claim: every write a worker makes about a
    running job carries it, and a stale worker's writes are refused.
    """

    type: JobType
    repo: str = ""
    branch: str = "main"
    commit: str = ""
    arch: str = ""
    trigger: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    state: JobState = JobState.QUEUED
    queue: str = ""
    attempts: int = 0
    max_attempts: int = 3
    timeout_s: float = 3600.0
    created_at: float = 0.0
    enqueued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    worker: str = ""
    token: str = ""
    due_at: float = 0.0
    commit_sha: str = ""
    framework_version: str = ""
    nightly_id: str = ""
    cancel_reason: str = ""
    superseded_by: str = ""
    deferred_behind: str = ""
    error: str = ""
    log_path: str = ""

    def __post_init__(self) -> None:
        self.type = JobType(self.type)
        self.state = JobState(self.state)
        if not self.id:
            self.id = new_job_id()
        if not self.created_at:
            self.created_at = time.time()
        if not self.queue:
            self.queue = queue_for(self.type, self.arch or None)

    def validate(self) -> Job:
        """Check every identifier that came from outside; return self.

        Raises:
            InvalidIdentifierError: for the first identifier that breaks its rule.
        """
        validate_job_id(self.id)
        if self.type.is_lab or self.repo:
            validate_repo(self.repo)
            validate_branch(self.branch)
        if self.commit:
            validate_commit(self.commit)
        if self.type.is_lab:
            validate_arch(self.arch)
        return self

    @property
    def triple(self) -> str:
        """The lock triple ``repo|branch|arch`` (empty for jobs that take no lock)."""
        if not self.type.is_lab:
            return ""
        return make_triple(self.repo, self.branch, self.arch)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_mapping(self) -> dict[str, str]:
        """Return the job as a flat mapping of strings for a Redis hash."""
        out: dict[str, str] = {}
        for key in _FIELD_NAMES:
            value = getattr(self, key)
            if key == "params":
                out[key] = json.dumps(value, sort_keys=True)
            elif isinstance(value, enum.Enum):
                out[key] = str(value.value)
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, str] | Mapping[bytes, bytes]) -> Job:
        """Rebuild a job from a Redis hash (bytes or str keys and values)."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in data.items()
        }
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in text:
                continue
            raw = text[f.name]
            if f.name == "params":
                kwargs[f.name] = json.loads(raw) if raw else {}
            elif f.type == "int":
                kwargs[f.name] = int(float(raw or 0))
            elif f.type == "float":
                kwargs[f.name] = float(raw or 0)
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)

    def public_dict(self) -> dict[str, Any]:
        """Return the job for display and JSON output (no fencing token)."""
        data = asdict(self)
        data.pop("token", None)
        data["type"] = self.type.value
        data["state"] = self.state.value
        return data


_FIELD_NAMES = tuple(f.name for f in fields(Job))
