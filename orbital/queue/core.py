"""Queue operations on Redis: enqueue, cancel, claim, lease, finish, reap.

Every step that touches more than one key runs as one Lua script (see
``lua/``), so the queue never shows a half-done transition. :class:`Queue` is
the blocking interface used by the CLI, notebooks and services;
:class:`AsyncQueue` is what a worker's event loop uses.

Queues are Redis lists whose right end is the head: new jobs are pushed on the
left, a job handed back by the reaper is pushed on the right so it runs next,
and a claim moves the rightmost id into the worker's claimed list atomically
(BLMOVE), so a job id is always in exactly one place in Redis.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio

from orbital.errors import UnknownJobError
from orbital.jobs import Job
from orbital.keys import Keys
from orbital.masking import mask_text
from orbital.queue.scripts import SCRIPT_NAMES, clock_args, script_source
from orbital.settings import Settings

__all__ = [
    "AsyncQueue",
    "CancelResult",
    "EnqueueResult",
    "Queue",
    "ReapReport",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class EnqueueResult:
    """What happened to an enqueued job.

    ``outcome`` is ``queued``, ``deferred`` (``holder`` runs the triple now),
    ``scheduled`` (a delayed job) or ``exists`` (a job with that id was already
    stored; ``state`` is its state and nothing changed).
    """

    job_id: str
    outcome: str
    holder: str = ""
    state: str = ""


@dataclass(frozen=True)
class CancelResult:
    """``outcome`` is ``cancelled``, ``cancelling`` (its worker is killing it),
    ``final`` (already ended: ``previous`` is its state) or ``unknown``."""

    job_id: str
    outcome: str
    previous: str


@dataclass
class ReapReport:
    """What one reaper pass did, by outcome (``requeued``, ``lost``...)."""

    outcomes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, outcome: str, job_id: str) -> None:
        self.outcomes.setdefault(outcome, []).append(job_id)

    def count(self, outcome: str) -> int:
        return len(self.outcomes.get(outcome, []))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _masked(value: Any, secrets: list[str]) -> Any:
    """``value`` with every string inside it masked: job records never hold secrets,
    even when a caller passes one in a job's parameters."""
    if isinstance(value, str):
        return mask_text(value, secrets)
    if isinstance(value, dict):
        return {k: _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    return value


def _job_fields(job: Job) -> str:
    mapping = job.to_mapping()
    mapping.pop("state", None)
    return json.dumps(mapping)


class _Base:
    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.clock = clock

    def _argv(self, *args: object) -> list[str]:
        return clock_args(self.keys.prefix, self.clock()) + [str(a) for a in args]

    def _lease_ms(self) -> int:
        return int(self.settings.lease_s * 1000)


class Queue(_Base):
    """Blocking queue operations on one Redis client."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Clock = time.time) -> None:
        super().__init__(settings, clock)
        self.client = client
        self._scripts = {n: client.register_script(script_source(n)) for n in SCRIPT_NAMES}

    def _run(self, name: str, *args: object) -> Any:
        return self._scripts[name](keys=[], args=self._argv(*args))

    def enqueue(self, job: Job, *, due_at: float = 0.0) -> EnqueueResult:
        """Validate and store ``job``, then queue it, defer it behind a busy triple,
        or hold it as a delayed job until ``due_at`` (epoch seconds).

        Raises:
            InvalidIdentifierError: if the repository, branch, commit, arch or id
                is refused; nothing is stored then.
        """
        outcome, detail = self._scripts["enqueue"](keys=[], args=self._enqueue_args(job, due_at))
        outcome, detail = _text(outcome), _text(detail)
        if outcome == "exists":
            return EnqueueResult(job.id, outcome, state=detail)
        return EnqueueResult(job.id, outcome, holder=detail if outcome == "deferred" else "")

    def enqueue_in(self, pipe: redis.client.Pipeline, job: Job, *, due_at: float = 0.0) -> None:
        """Add ``job``'s enqueue to ``pipe`` (a MULTI), checked and masked exactly
        as :meth:`enqueue` does, so many jobs can be stored in one transaction.

        Raises:
            InvalidIdentifierError: before anything is added to the pipeline.
        """
        self._scripts["enqueue"](keys=[], args=self._enqueue_args(job, due_at), client=pipe)

    def _enqueue_args(self, job: Job, due_at: float) -> list[str]:
        """Validate ``job``, mask its params, fill defaults; return the script's ARGV."""
        job.validate()
        job.params = _masked(job.params, self.settings.secret_values())
        if not job.max_attempts:
            job.max_attempts = self.settings.max_attempts
        return self._argv(job.id, _job_fields(job), due_at)

    def cancel(self, job_id: str, reason: str = "cancelled by an operator") -> CancelResult:
        """Cancel a job in any state that has not ended.

        A waiting job ends at once; a running job is marked cancelled (final) and
        its worker is told to kill it.
        """
        outcome, previous = self._run("cancel", job_id, reason)
        return CancelResult(job_id, _text(outcome), _text(previous))

    def get_job(self, job_id: str) -> Job:
        """Return the job record.

        Raises:
            UnknownJobError: if no job with that id exists (or it expired).
        """
        data = cast(dict[bytes, bytes], self.client.hgetall(self.keys.job(job_id)))
        if not data:
            raise UnknownJobError(f"unknown job {job_id!r}: no record in Redis")
        return Job.from_mapping(data)

    def get_jobs(self, job_ids: Iterable[str]) -> list[Job]:
        """Return the records of ``job_ids`` that exist, in order, in one round trip."""
        ids = list(job_ids)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        return [Job.from_mapping(d) for d in pipe.execute() if d]

    def queue_names(self) -> list[str]:
        return sorted(_text(n) for n in cast(set[bytes], self.client.smembers(self.keys.queues)))

    def depth(self, queue: str) -> int:
        """Number of jobs waiting in ``queue`` (the true count: LLEN of the list)."""
        return int(cast(int, self.client.llen(self.keys.queue(queue))))

    def depths(self) -> dict[str, int]:
        names = self.queue_names()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.llen(self.keys.queue(name))
        return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    def active_jobs(self, limit: int = 1000) -> list[Job]:
        """Jobs not yet ended (scheduled, deferred, queued, running), oldest first."""
        active = cast(list[bytes], self.client.zrange(self.keys.jobs_active, 0, limit - 1))
        ids = [_text(i) for i in active]
        return self.get_jobs(ids)

    def ended_jobs(self, limit: int = 100) -> list[Job]:
        """The most recently ended jobs, newest first."""
        ids = cast(list[bytes], self.client.zrevrange(self.keys.jobs_ended, 0, limit - 1))
        return self.get_jobs(_text(i) for i in ids)

    def promote_due(self, batch: int = 500) -> int:
        """Admit delayed jobs whose time has come; return how many."""
        return int(self._run("promote", batch))

    def reap(self) -> ReapReport:
        """Hand back jobs claimed by dead workers or whose lease expired."""
        report = ReapReport()
        workers = cast(set[bytes], self.client.smembers(self.keys.workers))
        for worker_id in sorted(_text(w) for w in workers):
            dead = not self.client.exists(self.keys.worker(worker_id))
            claimed_ids = cast(list[bytes], self.client.lrange(self.keys.claimed(worker_id), 0, -1))
            claimed = [_text(j) for j in claimed_ids]
            for job_id in claimed:
                outcome = _text(self._run("reap", job_id, worker_id, "1" if dead else "0"))
                report.add(outcome, job_id)
            if dead and not self.client.llen(self.keys.claimed(worker_id)):
                self.client.srem(self.keys.workers, worker_id)
        _log_reap(report)
        return report


class AsyncQueue(_Base):
    """The queue steps a worker takes, on an asyncio Redis client."""

    def __init__(
        self, client: redis.asyncio.Redis, settings: Settings, clock: Clock = time.time
    ) -> None:
        super().__init__(settings, clock)
        self.client = client
        self._scripts = {n: client.register_script(script_source(n)) for n in SCRIPT_NAMES}

    async def _run(self, name: str, *args: object) -> Any:
        return await self._scripts[name](keys=[], args=self._argv(*args))

    async def claim(self, queue: str, worker_id: str, timeout_s: float) -> str | None:
        """Block up to ``timeout_s`` for a job and move its id into the worker's
        claimed list; return the id, or None if the queue stayed empty."""
        job_id = await self.client.blmove(
            self.keys.queue(queue),
            self.keys.claimed(worker_id),
            timeout_s,  # type: ignore[arg-type]  # redis-py's stub says int; Redis takes seconds as a float
            "RIGHT",
            "LEFT",
        )
        return None if job_id is None else _text(job_id)

    async def start(self, job_id: str, worker_id: str, token: str) -> tuple[str, str, Job | None]:
        """Mark a claimed job running under a fresh lease; return (outcome, detail,
        job): ``ok`` with the queue wait in seconds and the job's record, or
        ``skip``/``gone`` (and no job) when it was cancelled or removed after it
        was popped."""
        reply = await self._run("start", job_id, worker_id, token, self._lease_ms())
        outcome, detail = _text(reply[0]), _text(reply[1])
        if outcome != "ok":
            return outcome, detail, None
        flat = reply[2]
        return outcome, detail, Job.from_mapping(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def renew(self, job_id: str, worker_id: str, token: str) -> str:
        """Extend the lease; return ``ok``, ``cancelled`` or ``lost``."""
        return _text(await self._run("renew", job_id, worker_id, token, self._lease_ms()))

    async def update(self, job_id: str, token: str, fields: Mapping[str, object]) -> bool:
        """Set fields on a job the caller still holds; False if it no longer does."""
        return bool(await self._run("update", job_id, token, json.dumps(dict(fields))))

    async def finish(
        self,
        job_id: str,
        worker_id: str,
        token: str,
        state: str,
        *,
        build: Mapping[str, Any] | None = None,
        fields: Mapping[str, object] | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> tuple[str, str]:
        """End a job the worker holds: final state, build record, events, lock
        release, all in one step. Returns (outcome, state): ``ended`` with the
        recorded state (``cancelled`` wins over what the worker saw), or
        ``stale``/``final``/``gone`` when nothing was written."""
        outcome, final = await self._run(
            "finish",
            job_id,
            worker_id,
            token,
            state,
            json.dumps(build) if build is not None else "",
            json.dumps({k: str(v) for k, v in (fields or {}).items()}),
            json.dumps(events or []),
        )
        return _text(outcome), _text(final)

    async def handback(self, job_id: str, worker_id: str, token: str) -> str:
        """Return a running job to the head of its queue without counting the
        attempt (a draining worker that will not finish it)."""
        return _text(await self._run("handback", job_id, worker_id, token))

    async def get_job(self, job_id: str) -> Job:
        data = await self.client.hgetall(self.keys.job(job_id))  # type: ignore[misc]
        if not data:
            raise UnknownJobError(f"unknown job {job_id!r}: no record in Redis")
        return Job.from_mapping(data)

    async def promote_due(self, batch: int = 500) -> int:
        return int(await self._run("promote", batch))

    async def reap(self) -> ReapReport:
        """Hand back jobs claimed by dead workers or whose lease expired."""
        report = ReapReport()
        workers = await self.client.smembers(self.keys.workers)  # type: ignore[misc]
        for worker_id in sorted(_text(w) for w in workers):
            dead = not await self.client.exists(self.keys.worker(worker_id))
            claimed_key = self.keys.claimed(worker_id)
            claimed = await self.client.lrange(claimed_key, 0, -1)  # type: ignore[misc]
            for job_id in (_text(j) for j in claimed):
                outcome = await self._run("reap", job_id, worker_id, "1" if dead else "0")
                report.add(_text(outcome), job_id)
            if dead and not await self.client.llen(claimed_key):  # type: ignore[misc]
                await self.client.srem(self.keys.workers, worker_id)  # type: ignore[misc]
        _log_reap(report)
        return report


def _log_reap(report: ReapReport) -> None:
    for outcome in ("requeued", "lost", "cancelled"):
        for job_id in report.outcomes.get(outcome, []):
            if outcome == "requeued":
                logger.warning("reaper: job %s lost its lease; requeued at the head", job_id)
            elif outcome == "lost":
                logger.error("reaper: job %s ran out of attempts; recorded as lost", job_id)
            else:
                logger.warning("reaper: job %s was cancelled and its worker died; ended", job_id)
