"""Live job logs: masked before they are stored, streamed through Redis, archived.

A worker writes a job's output through a :class:`LogWriter`: every chunk is
masked for secret values and token shapes (:mod:`orbital.masking`), appended to
the job's Redis stream (any process can follow it live) and to the job's
archive file under ``<home>/logs``. When the job ends the stream gets an end
marker and an expiry; the archive stays.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

import redis
import redis.asyncio

from orbital.errors import LogExpiredError, UnknownLogError
from orbital.jobs import TERMINAL_STATES, JobState
from orbital.keys import Keys
from orbital.masking import StreamMasker

__all__ = ["LogWriter", "follow_log", "read_log"]

logger = logging.getLogger(__name__)

_DATA = b"d"
_END = b"end"


class LogWriter:
    """Writes one job's log: masked, to Redis and to the archive file.

    Args:
        client: the worker's asyncio Redis client.
        keys: key builder for the installation's prefix.
        job_id: whose log this is.
        secrets: secret values to mask (token shapes are always masked).
        archive_path: where the durable copy goes.
        max_entries: approximate cap of the live stream (oldest entries trimmed;
            the archive keeps everything).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        job_id: str,
        secrets: Iterable[str],
        archive_path: Path,
        max_entries: int = 100_000,
    ) -> None:
        self.client = client
        self.key = keys.log(job_id)
        self.job_id = job_id
        self.archive_path = archive_path
        self.max_entries = max_entries
        self._masker = StreamMasker(secrets)
        archive_path.parent.mkdir(parents=True, exist_ok=True)
        self._archive: BinaryIO | None = open(archive_path, "ab")  # noqa: SIM115 - closed in close()

    async def write(self, data: bytes) -> None:
        """Mask and store a chunk of raw output (secrets split across chunks included)."""
        await self._store(self._masker.feed(data))

    async def line(self, text: str) -> None:
        """Store one line of Orbital's own narration (step banners, outcomes)."""
        await self._store(self._masker.feed(text.encode() + b"\n"))

    async def flush(self) -> None:
        """Store whatever the masker still holds (call at the end of each step)."""
        await self._store(self._masker.flush())

    async def _store(self, masked: bytes) -> None:
        if not masked:
            return
        if self._archive is not None:
            self._archive.write(masked)
            self._archive.flush()
        await self.client.xadd(self.key, {_DATA: masked}, maxlen=self.max_entries, approximate=True)

    async def close(self, ttl_s: float) -> None:
        """Flush, mark the stream ended, let it expire after ``ttl_s``, close the archive."""
        await self.flush()
        if self._archive is not None:
            os.fsync(self._archive.fileno())
            self._archive.close()
            self._archive = None
        await self.client.xadd(self.key, {_END: b"1"})
        await self.client.expire(self.key, max(1, int(ttl_s)))


def _job_state(client: redis.Redis, keys: Keys, job_id: str) -> tuple[str, str, bool] | None:
    """(state, log path, whether it ever started), or None for an unknown job."""
    raw = cast(
        list[bytes | None], client.hmget(keys.job(job_id), ["state", "log_path", "started_at"])
    )
    if raw[0] is None:
        return None
    started = float((raw[2] or b"0").decode() or 0) > 0
    return raw[0].decode(), (raw[1] or b"").decode(), started


def read_log(client: redis.Redis, keys: Keys, job_id: str) -> bytes:
    """Return a job's whole log: from Redis while it is live, else from the archive.

    Raises:
        UnknownLogError: no job with that id exists and no log was recorded.
        LogExpiredError: the job exists but its live log expired and the archive
            is not on this machine.
    """
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.log(job_id)))
    if entries:
        return b"".join(fields.get(_DATA, b"") for _, fields in entries)

    job = _job_state(client, keys, job_id)
    if job is None:
        raise UnknownLogError(
            f"no log for {job_id!r}: no such job (unknown id, or its record expired)"
        )
    state, log_path, started = job
    if log_path and Path(log_path).is_file():
        return Path(log_path).read_bytes()
    if state in TERMINAL_STATES and started:
        where = f" and its archive {log_path} is not on this machine" if log_path else ""
        raise LogExpiredError(f"the live log of job {job_id} ({state}) expired{where}")
    return b""


def follow_log(
    client: redis.Redis,
    keys: Keys,
    job_id: str,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Iterator[bytes]:
    """Yield a job's log from the start, then live as it is written, until it ends.

    Raises:
        UnknownLogError: if the job does not exist.
        LogExpiredError: if the live log expired and no archive is here.
    """
    key = keys.log(job_id)
    if not client.exists(key):
        # Not started yet, or already expired: read_log tells which.
        job = _job_state(client, keys, job_id)
        if job is None or job[0] in TERMINAL_STATES:
            yield read_log(client, keys, job_id)
            return

    last_id = b"0-0"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
            client.xread({key: last_id}, block=int(poll_s * 1000), count=500),
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                if _END in fields:
                    return
                yield fields.get(_DATA, b"")
        if not reply:
            state = cast(bytes | None, client.hget(keys.job(job_id), "state"))
            if (
                state is not None
                and JobState(state.decode()) in TERMINAL_STATES
                and not client.exists(key)
            ):
                return
