"""Every Redis key name Orbital uses, built in one place.

All keys live under one configurable prefix so several Orbital installations can
share a Redis server, and so an operator can find everything with one SCAN
pattern. Triples (repository, branch, arch) are joined with ``|``, which no
validated identifier can contain.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix."""

    prefix: str = "orbital"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # jobs ---------------------------------------------------------------
    def job(self, job_id: str) -> str:
        """Hash: the job record."""
        return self._k("job", job_id)

    def queue(self, name: str) -> str:
        """List of waiting job ids; the right end is the head (claimed first)."""
        return self._k("queue", name)

    @property
    def queues(self) -> str:
        """Set of every queue name that has ever held a job."""
        return self._k("queues")

    def lease(self, job_id: str) -> str:
        """String with a TTL: the worker id holding the running job."""
        return self._k("lease", job_id)

    def cancel_channel(self) -> str:
        """Pub/sub channel announcing cancelled running jobs."""
        return self._k("cancel")

    @property
    def delayed(self) -> str:
        """Sorted set of scheduled job ids scored by due time (epoch seconds)."""
        return self._k("delayed")

    @property
    def jobs_ended(self) -> str:
        """Sorted set of every ended job id scored by end time."""
        return self._k("jobs", "ended")

    @property
    def jobs_active(self) -> str:
        """Sorted set of job ids not yet ended, scored by creation time."""
        return self._k("jobs", "active")

    # locks -------------------------------------------------------------
    def lock(self, triple: str) -> str:
        """String: the job id holding the repo|branch|arch triple."""
        return self._k("lock", triple)

    def deferred(self, triple: str) -> str:
        """String: the job id waiting for the triple."""
        return self._k("deferred", triple)

    @property
    def locks(self) -> str:
        """Set of triples that currently hold a lock (for inspection)."""
        return self._k("locks")

    # workers -----------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """Hash with a TTL: the worker's registration, refreshed by each heartbeat."""
        return self._k("worker", worker_id)

    def claimed(self, worker_id: str) -> str:
        """List of job ids the worker has claimed and not yet finished."""
        return self._k("worker", worker_id, "claimed")

    @property
    def workers(self) -> str:
        """Set of worker ids that may still own claimed jobs."""
        return self._k("workers")

    # builds ------------------------------------------------------------
    def build(self, job_id: str) -> str:
        """String: the build record as JSON."""
        return self._k("build", job_id)

    @property
    def builds_all(self) -> str:
        return self._k("builds", "all")

    @property
    def builds_passed(self) -> str:
        return self._k("builds", "passed")

    def builds_repo(self, repo: str) -> str:
        return self._k("builds", "repo", repo)

    def builds_repo_passed(self, repo: str) -> str:
        return self._k("builds", "repo", repo, "passed")

    def builds_triple(self, triple: str) -> str:
        return self._k("builds", "triple", triple)

    @property
    def triage(self) -> str:
        """Sorted set of triples scored by consecutive failures (0 is removed)."""
        return self._k("triage")

    # logs --------------------------------------------------------------
    def log(self, job_id: str) -> str:
        """Stream: the job's live log."""
        return self._k("log", job_id)

    # scheduler ---------------------------------------------------------
    def nightly(self, run_id: str) -> str:
        """Hash: one nightly run's plan and totals."""
        return self._k("nightly", run_id)

    @property
    def nightlies(self) -> str:
        """Sorted set of nightly run ids scored by start time."""
        return self._k("nightlies")

    def nightly_fired(self, slot: str) -> str:
        """String: marks a cron slot as already planned (set once, with NX)."""
        return self._k("nightly", "fired", slot)

    # events ------------------------------------------------------------
    @property
    def outbox(self) -> str:
        """Stream: CloudEvents waiting to be shipped."""
        return self._k("events", "outbox")

    @property
    def dead_letters(self) -> str:
        """List: events the ingest API rejected, with the reason."""
        return self._k("events", "dead")

    @property
    def shipper_lock(self) -> str:
        """String with a TTL: the one shipper allowed to send."""
        return self._k("events", "outbox", "shipper")

    # sync --------------------------------------------------------------
    @property
    def sync_drift(self) -> str:
        """Hash: repository -> its latest drift result (JSON)."""
        return self._k("sync", "drift")

    @property
    def sync_last(self) -> str:
        """Hash: the last drift check's target, counts and time."""
        return self._k("sync", "last")

    def sync_fired(self, slot: str) -> str:
        """String: marks an hourly drift slot as already queued (set once, with NX)."""
        return self._k("sync", "fired", slot)

    @property
    def sync_pending(self) -> str:
        """String: the id of the drift job queued and not yet ended."""
        return self._k("sync", "pending")

    # github ------------------------------------------------------------
    def webhook_delivery(self, delivery_id: str) -> str:
        """String with a TTL: an ``X-GitHub-Delivery`` id already accepted."""
        return self._k("github", "delivery", delivery_id)

    def webhook_once(self, subject_key: str) -> str:
        """String: the one job a subject (an issue, a head commit) may start."""
        return self._k("github", "once", subject_key)


def triple(repo: str, branch: str, arch: str) -> str:
    """Join a repository, branch and arch into the lock key part."""
    return f"{repo}|{branch}|{arch}"
