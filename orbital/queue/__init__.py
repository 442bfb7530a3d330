"""The Redis job queue: reliable claim, leases, per-triple locks, delayed jobs."""

from __future__ import annotations

from orbital.queue.core import AsyncQueue, CancelResult, EnqueueResult, Queue, ReapReport

__all__ = ["AsyncQueue", "CancelResult", "EnqueueResult", "Queue", "ReapReport"]
