"""Live logs through Redis: follow from another process, archive, and the
errors for unknown and expired logs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from orbital.connection import async_client
from orbital.errors import LogExpiredError, UnknownLogError
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.logs import LogWriter, read_log
from orbital.queue import Queue
from orbital.settings import Settings

pytestmark = pytest.mark.anyio


async def test_log_is_followed_live_from_another_process(
    client: redis.Redis, settings: Settings
) -> None:
    """A reader in another process sees lines as they are written and stops at the end."""
    job = Job(type=JobType.INTEGRATION_TEST, repo="acme/a", arch="amd64")
    Queue(client, settings).enqueue(job)
    code = (
        "import sys, redis; from orbital.keys import Keys; from orbital.logs import follow_log\n"
        f"c = redis.Redis.from_url({settings.redis_url!r})\n"
        f"for chunk in follow_log(c, Keys({settings.prefix!r}), {job.id!r}, poll_s=0.1, timeout_s=20):\n"
        "    sys.stdout.write(chunk.decode()); sys.stdout.flush()\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    aclient = async_client(settings.redis_url)
    writer = LogWriter(aclient, Keys(settings.prefix), job.id, ["hunter2"], settings.home / "a.log")
    await writer.write(b"first line\n")
    assert reader.stdout is not None
    assert reader.stdout.readline() == "first line\n"
    await writer.write(b"password hun")
    await writer.write(b"ter2 done\n")
    await writer.close(ttl_s=60)
    rest, _ = reader.communicate(timeout=20)
    assert rest == "password *** done\n"
    assert (settings.home / "a.log").read_bytes() == b"first line\npassword *** done\n"
    await aclient.aclose()


def test_unknown_job_log_says_so(client: redis.Redis, settings: Settings) -> None:
    """Reading the log of an id that never existed names the problem."""
    with pytest.raises(UnknownLogError, match="no such job"):
        read_log(client, Keys(settings.prefix), "j-never")


async def test_expired_log_without_archive_says_expired(
    client: redis.Redis, settings: Settings
) -> None:
    """A finished job whose live log expired, with no archive here, reports expiry."""
    job = Job(type=JobType.INTEGRATION_TEST, repo="acme/a", arch="amd64")
    queue = Queue(client, settings)
    queue.enqueue(job)
    aclient = async_client(settings.redis_url)
    writer = LogWriter(aclient, Keys(settings.prefix), job.id, [], settings.home / "b.log")
    await writer.write(b"hello\n")
    await writer.close(ttl_s=1)
    await aclient.aclose()
    keys = Keys(settings.prefix)
    client.hset(
        keys.job(job.id), mapping={"log_path": str(settings.home / "gone.log"), "started_at": "1"}
    )
    queue.cancel(job.id)
    assert read_log(client, keys, job.id) == b"hello\n"
    time.sleep(1.2)
    with pytest.raises(LogExpiredError, match="expired"):
        read_log(client, keys, job.id)
    # With the archive present the log is still readable after expiry.
    client.hset(keys.job(job.id), "log_path", str(settings.home / "b.log"))
    assert read_log(client, keys, job.id) == b"hello\n"
