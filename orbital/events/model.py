"""Business events as CloudEvents, and appending them to the outbox.

Most events are written by the queue's Lua scripts (``emit()`` in
``orbital/queue/lua/prelude.lua``) in the same step that changes a job's state.
Events that start in Python (``worker.heartbeat``, ``agent.<type>``,
``sync.drift``) are built here in exactly the same shape and appended to the
same stream, one entry per event with the single field ``e`` holding the
CloudEvent as JSON:

* ``specversion`` ``1.0``; ``id`` stable, so a re-sent event can be recognised
  downstream; ``source`` ``orbital/<prefix>``; ``type``; ``subject`` (the job,
  worker or run the event is about); ``time`` in ISO 8601 UTC with milliseconds;
  ``datacontenttype`` ``application/json``;
* ``data``: flat keys. Job events carry the join fields ``job.id``,
  ``job.type``, ``repository.name``, ``arch``, ``branch``, ``commit_sha``,
  ``worker_id``, ``triggered_by``, ``framework.version``, ``nightly.run_id`` and
  ``attempt``; a field without a real value is left out, never sent as a
  placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import redis
import redis.asyncio

from orbital.errors import EventError
from orbital.jobs import Job
from orbital.keys import Keys
from orbital.queue.scripts import clock_args

__all__ = [
    "DATA_CONTENT_TYPE",
    "ORBITAL_VERSION",
    "OUTBOX_FIELD",
    "SPECVERSION",
    "aemit",
    "cloud_event",
    "emit",
    "encode",
    "heartbeat_event",
    "iso_time",
    "job_event",
    "join_fields",
]

SPECVERSION = "1.0"
DATA_CONTENT_TYPE = "application/json"
#: The one field of an outbox stream entry; its value is the CloudEvent JSON.
OUTBOX_FIELD = "e"

_REQUIRED = ("specversion", "id", "source", "type")


def _installed_version() -> str:
    try:
        return metadata.version("orbital")
    except metadata.PackageNotFoundError:
        return "0+unknown"


#: Orbital's version as installed (the package metadata, which every install has).
ORBITAL_VERSION = _installed_version()


def iso_time(now: float) -> str:
    """Return epoch seconds as the ``time`` attribute the Lua scripts write
    (``2024-05-01T02:00:00.123Z``)."""
    return clock_args("", now)[2]


def join_fields(job: Job) -> dict[str, Any]:
    """Return the join fields of a job event, leaving out those with no value
    (the same rule as the Lua ``emit()``)."""
    fields: dict[str, Any] = {
        "job.id": job.id,
        "job.type": job.type.value,
        "repository.name": job.repo,
        "arch": job.arch,
        "branch": job.branch,
        "commit_sha": job.commit_sha or job.commit,
        "worker_id": job.worker,
        "triggered_by": job.trigger,
        "framework.version": job.framework_version,
        "nightly.run_id": job.nightly_id,
    }
    data = {key: value for key, value in fields.items() if value}
    data["attempt"] = job.attempts
    return data


def cloud_event(
    prefix: str,
    event_type: str,
    *,
    event_id: str,
    subject: str,
    data: Mapping[str, Any],
    now: float,
) -> dict[str, Any]:
    """Return one CloudEvent in Orbital's shape.

    Args:
        prefix: the installation's key prefix; the source is ``orbital/<prefix>``.
        event_type: e.g. ``sync.drift``.
        event_id: a stable id: the same fact must always get the same id.
        subject: what the event is about (job id, worker id, run id).
        data: flat keys; values must be JSON-serialisable.
        now: the event time, epoch seconds.
    """
    return {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": f"orbital/{prefix}",
        "type": event_type,
        "subject": subject,
        "time": iso_time(now),
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": dict(data),
    }


def job_event(
    prefix: str,
    event_type: str,
    job: Job,
    extra: Mapping[str, Any] | None = None,
    *,
    now: float,
    suffix: str = "",
) -> dict[str, Any]:
    """Return an event about ``job``, e.g. ``agent.fix-issue``: its join fields plus
    ``extra``, with the id ``<job id>.<type>.<attempt><suffix>`` as the Lua scripts
    build it (``suffix`` tells apart several events of one type and attempt)."""
    data = join_fields(job)
    data.update(extra or {})
    return cloud_event(
        prefix,
        event_type,
        event_id=f"{job.id}.{event_type}.{job.attempts}{suffix}",
        subject=job.id,
        data=data,
        now=now,
    )


def heartbeat_event(registration: Mapping[str, str], *, prefix: str) -> dict[str, Any]:
    """Return a ``worker.heartbeat`` event from a worker's registration hash (the
    mapping ``Registration.to_mapping()`` returns and the worker publishes).

    The id is the worker id and the beat's time in milliseconds, so it is unique
    per beat and stays the same if the event is sent again.

    Raises:
        EventError: if the mapping has no ``id`` or ``last_heartbeat``.
    """
    worker_id = registration.get("id", "")
    beat = registration.get("last_heartbeat", "")
    if not worker_id or not beat:
        raise EventError(
            f"worker.heartbeat: the registration needs 'id' and 'last_heartbeat', got keys "
            f"{sorted(registration)}"
        )
    now = float(beat)
    sandbox = _json_object(registration.get("sandbox", ""))
    data: dict[str, Any] = {
        "worker_id": worker_id,
        "arch": registration.get("arch", ""),
        "host": registration.get("host", ""),
        "status": registration.get("status", ""),
        "queues": registration.get("queues", ""),
        "capacity": registration.get("capacity", ""),
        "capacity_total": int(registration.get("capacity_total") or 0),
        "active_jobs": int(registration.get("active") or 0),
        "sandbox.kind": str(sandbox.get("kind", "")),
        "sandbox.isolation": str(sandbox.get("isolation", "")),
        "uptime_s": round(now - float(registration.get("started_at") or now), 3),
        "orbital.version": ORBITAL_VERSION,
    }
    return cloud_event(
        prefix,
        "worker.heartbeat",
        event_id=f"{worker_id}.worker.heartbeat.{int(now * 1000)}",
        subject=worker_id,
        data={key: value for key, value in data.items() if value != ""},
        now=now,
    )


def encode(event: Mapping[str, Any]) -> str:
    """Check that ``event`` is a CloudEvent the ingest API takes and return its JSON.

    Raises:
        EventError: naming the missing or wrong attribute and the event id.
    """
    for name in _REQUIRED:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise EventError(
                f"event {event.get('id')!r}: CloudEvents attribute {name!r} must be a "
                f"non-empty string, got {value!r}"
            )
    if event["specversion"] != SPECVERSION:
        raise EventError(
            f"event {event['id']!r}: specversion must be {SPECVERSION!r}, "
            f"got {event['specversion']!r}"
        )
    if not isinstance(event.get("data", {}), Mapping):
        raise EventError(f"event {event['id']!r}: data must be a JSON object")
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise EventError(f"event {event['id']!r}: data is not JSON-serialisable: {err}") from None


def emit(client: redis.Redis, keys: Keys, event: Mapping[str, Any]) -> str:
    """Append ``event`` to the outbox; return its stream entry id.

    To make the event part of a state change, put it in the same MULTI (pipeline
    with ``transaction=True``) as the change: ``pipe.xadd(keys.outbox, {"e": encode(event)})``.

    Raises:
        EventError: if the event is not a valid CloudEvent (nothing is written).
    """
    entry_id = client.xadd(keys.outbox, {OUTBOX_FIELD: encode(event)})
    return _text(entry_id)


async def aemit(client: redis.asyncio.Redis, keys: Keys, event: Mapping[str, Any]) -> str:
    """Asyncio twin of :func:`emit`.

    Raises:
        EventError: if the event is not a valid CloudEvent (nothing is written).
    """
    entry_id = await client.xadd(keys.outbox, {OUTBOX_FIELD: encode(event)})
    return _text(entry_id)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
