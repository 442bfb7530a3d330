"""Queueing the periodic drift check (``sync_cron``, hourly by default).

Like the nightly, each cron slot is claimed once in Redis (``SET NX``), however
many scheduler processes run or restart, and a slot missed by more than
:data:`CATCH_UP_S` is not run late. A slot is also skipped while the previous
drift job has not ended (no manager worker is serving the ``sync`` queue, or it
is busy), so drift jobs never pile up.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import redis

from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.scheduler import cron_fire
from orbital.settings import Settings

__all__ = ["CATCH_UP_S", "enqueue_drift_if_due", "next_drift"]

logger = logging.getLogger(__name__)

#: A slot missed by more than this (the scheduler was down) is not run late.
CATCH_UP_S = 6 * 3600
_MARK_TTL_S = 7 * 86400
_UNFINISHED = {"scheduled", "deferred", "queued", "running"}


def _fired_key(keys: Keys, slot: str) -> str:
    return keys.sync_fired(slot)


def _pending_key(keys: Keys) -> str:
    return keys.sync_pending


def enqueue_drift_if_due(
    client: redis.Redis, settings: Settings, queue: Queue, now: float | None = None
) -> Job | None:
    """Queue a fleet drift job for the latest ``sync_cron`` slot at or before ``now``
    if no process has done so yet; return the job, or None when nothing was queued.

    Raises:
        ConfigError: if ``sync_cron`` is not a cron expression.
    """
    if not settings.sync_cron:
        return None
    now = time.time() if now is None else now
    keys = Keys(settings.prefix)
    slot_time = _previous_fire(settings.sync_cron, now)
    if now - slot_time > CATCH_UP_S:
        return None
    slot = (
        datetime.fromtimestamp(slot_time, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
    if not client.set(_fired_key(keys, slot), "1", nx=True, ex=_MARK_TTL_S):
        return None

    previous = _text(client.get(_pending_key(keys)))
    state = _text(client.hget(keys.job(previous), "state")) if previous else ""
    if state in _UNFINISHED:
        logger.info(
            "sync: drift slot %s skipped: the previous drift job %s is still %s "
            "(is a manager worker serving the sync queue?)",
            slot, previous, state,
        )  # fmt: skip
        return None

    job = Job(
        type=JobType.SYNC, params={"action": "drift", "slot": slot}, trigger="schedule",
        timeout_s=settings.job_timeout_s, max_attempts=settings.max_attempts,
    )  # fmt: skip
    queue.enqueue(job)
    client.set(_pending_key(keys), job.id, ex=_MARK_TTL_S)
    logger.info("sync: drift job %s queued for slot %s", job.id, slot)
    return job


def next_drift(cron: str, after: float) -> float:
    """Return the first time after ``after`` (epoch seconds) that ``cron`` (UTC) fires.

    Raises:
        ConfigError: if ``cron`` is not a cron expression.
    """
    return cron_fire(cron, after, setting="sync_cron")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else ""


def _previous_fire(cron: str, now: float) -> float:
    return cron_fire(cron, now, previous=True, setting="sync_cron")
