"""A worker's registration hash: who it is, what it serves, what it runs.

The hash is rewritten whole on every heartbeat and given a TTL, so a Redis
that restarted empty learns about the worker again within one beat, and a
worker that died disappears after the TTL (which is what the reaper checks).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from orbital.events import encode, heartbeat_event
from orbital.keys import Keys

__all__ = ["Registration", "new_worker_id"]


def new_worker_id(arch: str, name: str = "") -> str:
    """Return a worker id: ``name`` if given (a stable id lets a restarted worker
    recover its own jobs at once), else host, arch and a random suffix."""
    if name:
        return name
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower())[:30].strip("-")
    return f"{host or 'host'}-{arch}-{secrets.token_hex(3)}"


@dataclass
class Registration:
    """What the worker publishes about itself."""

    worker_id: str
    arch: str
    capacity: Mapping[str, int]
    sandbox: Mapping[str, Any]
    status: str = "starting"
    started_at: float = field(default_factory=time.time)
    active_jobs: dict[str, str] = field(default_factory=dict)  # job id -> queue

    def to_mapping(self) -> dict[str, str]:
        return {
            "id": self.worker_id,
            "arch": self.arch,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "status": self.status,
            "capacity": json.dumps(dict(self.capacity), sort_keys=True),
            "capacity_total": str(sum(self.capacity.values())),
            "queues": ",".join(sorted(self.capacity)),
            "active": str(len(self.active_jobs)),
            "active_jobs": json.dumps(sorted(self.active_jobs)),
            "sandbox": json.dumps(dict(self.sandbox), sort_keys=True),
            "started_at": repr(self.started_at),
            "last_heartbeat": repr(time.time()),
        }

    async def publish(
        self, client: redis.asyncio.Redis, keys: Keys, ttl_s: float, *, emit_event: bool = False
    ) -> None:
        """Write the whole hash with a fresh TTL and list the worker (one round trip);
        with ``emit_event``, a ``worker.heartbeat`` event goes into the outbox in the
        same transaction."""
        key = keys.worker(self.worker_id)
        mapping = self.to_mapping()
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, int(ttl_s * 1000))
            pipe.sadd(keys.workers, self.worker_id)
            if emit_event:
                event = encode(heartbeat_event(mapping, prefix=keys.prefix))
                pipe.xadd(keys.outbox, {"e": event})
            await pipe.execute()

    async def withdraw(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        """Remove the registration (a clean stop)."""
        await client.delete(keys.worker(self.worker_id))
