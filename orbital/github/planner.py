"""From a verified delivery to the jobs it should start (no Redis involved).

:func:`plan_delivery` matches the delivery against the routing table, reads its
subject, and builds one :class:`~orbital.jobs.Job` per job spec: an agent job, a
sync job, or one lab build per arch the fleet registry gives the (base)
repository. Job ids are derived from the delivery id and the spec, so handling
the same delivery twice (a redelivery after a failure) names the same jobs and
the queue stores each once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from orbital.errors import FleetError
from orbital.fleet import Fleet, load_fleet
from orbital.github.delivery import Delivery
from orbital.github.payloads import BuildTarget, Subject, facts_of, subject_of
from orbital.github.routing import JobSpec, RoutingTable
from orbital.jobs import Job, JobType
from orbital.settings import Settings

__all__ = ["FleetSource", "Plan", "PlannedJob", "delivery_job_id", "plan_delivery"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedJob:
    """A job to enqueue; ``once_key`` is set for "once per subject" jobs
    (``<repo>:<subject>:<action>``, unique across the fleet)."""

    job: Job
    once_key: str = ""
    what: str = ""


@dataclass
class Plan:
    """What a delivery leads to: jobs, notes on specs that produced no job, and
    ``ignored`` (the reason) when nothing at all is to be done, or ``pong``."""

    delivery: Delivery
    jobs: list[PlannedJob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: str = ""
    pong: bool = False


class FleetSource:
    """The fleet registry, re-read when its file changes.

    A registry that turns invalid keeps the last good one in use (logged once per
    change); with no file configured every repository is "not in the registry".
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._fleet: Fleet | None = None

    def get(self) -> Fleet | None:
        """Return the current registry (None when none is configured or readable)."""
        if not self.path:
            return None
        try:
            info = os.stat(self.path)
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()
            return self._fleet

    def _reload(self) -> None:
        try:
            self._fleet = load_fleet(self.path)
        except FleetError as err:
            kept = "keeping the previous registry" if self._fleet else "no builds until fixed"
            logger.error("webhook fleet registry %s is unusable, %s: %s", self.path, kept, err)


def delivery_job_id(delivery_id: str, key: str) -> str:
    """The job id for the job ``key`` of a delivery: stable across redeliveries,
    and a DNS label as every job id is."""
    digest = hashlib.sha256(f"{delivery_id}\0{key}".encode()).digest()
    return "gh" + base64.b32encode(digest).decode().lower().rstrip("=")[:24]


def plan_delivery(
    delivery: Delivery,
    table: RoutingTable,
    fleet: Fleet | None,
    settings: Settings,
) -> Plan:
    """Decide what ``delivery`` starts.

    Raises:
        WebhookRejectedError: 422 naming the payload field, when the delivery matched
            a rule but carries an invalid or missing identifier.
    """
    plan = Plan(delivery)
    if delivery.event == "ping":
        plan.pong = True
        return plan

    facts = facts_of(delivery.event, delivery.payload)
    specs = table.jobs_for(facts)
    if not specs:
        plan.ignored = f"no routing rule matches {facts.describe()}"
        return plan

    subject = subject_of(delivery.event, delivery.payload)
    if isinstance(subject, str):
        plan.ignored = subject
        return plan

    make = _JobMaker(delivery, subject, settings)
    for index, spec in enumerate(specs):
        if spec.kind == "builds":
            _plan_builds(plan, make, index, spec, fleet, subject)
        else:
            plan.jobs.append(make.job(index, spec))
    if not plan.jobs:
        plan.ignored = "; ".join(plan.notes)
    return plan


def _plan_builds(
    plan: Plan, make: _JobMaker, index: int, spec: JobSpec, fleet: Fleet | None, subject: Subject
) -> None:
    entry = fleet.by_repo(subject.registry_repo) if fleet else None
    reason = ""
    if subject.build is None:
        reason = subject.no_build
    elif entry is None:
        reason = f"{subject.registry_repo} is not in the fleet registry"
    elif not entry.ci:
        reason = f"{subject.registry_repo} has ci: false in the fleet registry"
    elif entry.status != "active":
        reason = f"{subject.registry_repo} is {entry.status} in the fleet registry"
    if reason or entry is None or subject.build is None:
        plan.notes.append(f"no {spec.action} builds: {reason}")
        return
    for arch in entry.arches:
        plan.jobs.append(make.build(index, spec, subject.build, arch))


class _JobMaker:
    """Builds the jobs of one delivery with shared fields and stable ids."""

    def __init__(self, delivery: Delivery, subject: Subject, settings: Settings) -> None:
        self.delivery = delivery
        self.subject = subject
        self.settings = settings

    def _common(self, key: str) -> dict[str, Any]:
        return {
            "id": delivery_job_id(self.delivery.delivery_id, key),
            "trigger": self.delivery.event,
            "timeout_s": self.settings.job_timeout_s,
            "max_attempts": self.settings.max_attempts,
        }

    def _origin(self) -> dict[str, Any]:
        return {"event": self.delivery.name, "delivery": self.delivery.delivery_id}

    def job(self, index: int, spec: JobSpec) -> PlannedJob:
        s = self.subject
        kind = JobType.AGENT if spec.kind == "agent" else JobType.SYNC
        params = {"action": spec.action, **self._origin(), **s.params}
        job = Job(type=kind, repo=s.repo, branch=s.branch, commit=s.commit, params=params,
                  **self._common(f"{index}:{spec.kind}:{spec.action}"))  # fmt: skip
        once = f"{s.repo.casefold()}:{s.once_id}:{spec.action}" if spec.once else ""
        return PlannedJob(job, once, f"{spec.describe()} for {s.noun}")

    def build(self, index: int, spec: JobSpec, target: BuildTarget, arch: str) -> PlannedJob:
        s = self.subject
        params = {**self._origin(), "registry_repo": s.registry_repo}
        if "pr_number" in s.params:
            params["pr_number"] = s.params["pr_number"]
        job = Job(type=JobType(spec.action), repo=target.repo, branch=target.branch,
                  commit=target.commit, arch=arch, params=params,
                  **self._common(f"{index}:builds:{spec.action}:{arch}"))  # fmt: skip
        what = f"{spec.action} on {arch} of {target.repo}@{target.branch} for {s.noun}"
        return PlannedJob(job, "", what)
