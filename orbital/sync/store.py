"""Drift results in Redis, written together with their ``sync.drift`` events.

Keys (under the installation's prefix)::

    <prefix>:sync:drift   hash  repo -> DriftResult JSON (the latest per repository)
    <prefix>:sync:last    hash  the last check: target, source, counts, time, by whom

A check's results, its summary and one ``sync.drift`` CloudEvent per repository
go to Redis in one MULTI transaction, so the outbox never tells Dynatrace about
a status that was not stored, nor the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis
import redis.asyncio

from orbital.events.model import OUTBOX_FIELD, cloud_event, encode, job_event
from orbital.jobs import Job
from orbital.keys import Keys
from orbital.sync.drift import DriftReport, DriftResult

__all__ = ["DriftStore", "drift_events", "drift_key", "last_check_key", "save_report"]


def drift_key(keys: Keys) -> str:
    """Hash: repo -> latest drift result JSON."""
    return keys.sync_drift


def last_check_key(keys: Keys) -> str:
    """Hash: the last drift check's target, counts and time."""
    return keys.sync_last


def _event_data(result: DriftResult, report: DriftReport) -> dict[str, Any]:
    data: dict[str, Any] = {
        "repository.name": result.repo,
        "branch": result.branch,
        "framework.version": result.current,
        "commit_sha": result.commit_sha,
        "current_version": result.current,
        "target_version": result.target,
        "target.source": report.target.source,
        "drifted": result.drifted,
        "status": result.status,
        "reason": result.reason,
        "registry.name": result.name,
    }
    return {key: value for key, value in data.items() if value != ""}


def drift_events(
    prefix: str, report: DriftReport, *, job: Job | None = None
) -> list[dict[str, Any]]:
    """One ``sync.drift`` CloudEvent per repository of ``report``: about ``job`` when
    the check ran as a job (with its join fields), else about the check itself."""
    events = []
    for result in report.results:
        data = _event_data(result, report)
        suffix = "." + result.repo.replace("/", ".")
        if job is not None:
            events.append(
                job_event(prefix, "sync.drift", job, data, now=report.checked_at, suffix=suffix)
            )
            continue
        events.append(cloud_event(
            prefix, "sync.drift", event_id=f"{report.checked_by}.sync.drift{suffix}",
            subject=report.checked_by, data=data, now=report.checked_at,
        ))  # fmt: skip
    return events


async def save_report(
    client: redis.asyncio.Redis,
    keys: Keys,
    report: DriftReport,
    events: Iterable[Mapping[str, Any]],
    *,
    replace: bool,
) -> None:
    """Store ``report`` and append ``events`` to the outbox in one transaction.

    Args:
        replace: the report covers the whole fleet: drop stored results of
            repositories it does not contain (removed from the registry, archived)
            and record it as the last check. A report on some repositories only
            updates theirs.

    Raises:
        EventError: if an event is not a valid CloudEvent (nothing is written).
    """
    encoded = [encode(event) for event in events]
    key = drift_key(keys)
    async with client.pipeline(transaction=True) as pipe:
        if replace:
            pipe.delete(key)
        if report.results:
            pipe.hset(
                key,
                mapping={r.repo: json.dumps(r.to_dict(), sort_keys=True) for r in report.results},
            )
        if replace:
            pipe.hset(last_check_key(keys), mapping=_last_check(report))
        for text in encoded:
            pipe.xadd(keys.outbox, {OUTBOX_FIELD: text})
        await pipe.execute()


def _last_check(report: DriftReport) -> dict[str, str]:
    return {
        "target": report.target.version,
        "source": report.target.source,
        "target_reason": report.target.reason,
        "checked_at": str(report.checked_at),
        "checked_by": report.checked_by,
        "counts": json.dumps(report.counts, sort_keys=True),
        "summary": report.summary(),
    }


class DriftStore:
    """Read side of the drift results (blocking client: CLI, notebooks, dashboard)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def results(self) -> list[DriftResult]:
        """Every stored result, by repository name."""
        raw: dict[bytes, bytes] = self.client.hgetall(drift_key(self.keys))  # type: ignore[assignment]
        results = [DriftResult.from_dict(json.loads(value)) for value in raw.values()]
        return sorted(results, key=lambda r: r.repo.casefold())

    def get(self, repo: str) -> DriftResult | None:
        """The stored result of one repository (``owner/name``), or None."""
        raw = self.client.hget(drift_key(self.keys), repo)
        return None if raw is None else DriftResult.from_dict(json.loads(raw))  # type: ignore[arg-type]

    def last_check(self) -> dict[str, Any]:
        """The last whole-fleet check's target, source, time, author and counts
        ({} if none ran)."""
        raw: dict[bytes, bytes] = self.client.hgetall(last_check_key(self.keys))  # type: ignore[assignment]
        data: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        if data:
            data["checked_at"] = float(data.get("checked_at") or 0)
            data["counts"] = json.loads(data.get("counts") or "{}")
        return data
