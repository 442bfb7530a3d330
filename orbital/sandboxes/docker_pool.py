"""The warm pool: one Docker slot per capacity unit, kept ready between jobs.

::

    warming ─> ready ─take─> busy ─give_back─> resetting ─> ready
       │         │ (dead)                          │ (failed, or the job was
       └ failed ─┴────────> rebuilding <───────────┘  cancelled / timed out)
                              │ backoff, retried until it works or the pool closes
                              └──> ready

Only ready, busy and resetting slots count as capacity. Resets, rebuilds and the
health check of idle slots run as background tasks on the worker's event loop;
the blocking Docker calls inside them run in worker threads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import docker

from orbital.errors import SandboxError
from orbital.sandboxes.docker_engine import DOCKER_ERRORS, remove_leftovers
from orbital.sandboxes.docker_slot import Slot, SlotConfig

__all__ = ["PoolTiming", "SlotPool", "SlotState"]

logger = logging.getLogger(__name__)


class SlotState(enum.StrEnum):
    WARMING = "warming"
    READY = "ready"
    BUSY = "busy"
    RESETTING = "resetting"
    REBUILDING = "rebuilding"
    FAILED = "failed"
    CLOSED = "closed"


_CAPACITY_STATES = {SlotState.READY, SlotState.BUSY, SlotState.RESETTING}


@dataclass(frozen=True)
class PoolTiming:
    """The pool's knobs, from settings."""

    warm_concurrency: int = 2
    warm_attempts: int = 3
    backoff_s: float = 2.0
    backoff_max_s: float = 120.0
    health_interval_s: float = 15.0
    take_timeout_s: float = 180.0
    close_grace_s: float = 60.0


@dataclass
class _Entry:
    slot: Slot
    state: SlotState = SlotState.WARMING
    error: str = ""
    failures: int = 0
    jobs: int = 0
    since: float = field(default_factory=time.time)

    def set(self, state: SlotState, error: str = "") -> None:
        self.state, self.since = state, time.time()
        if error:
            self.error = error


class SlotPool:
    """Warm slots for one worker; see the module docstring for the life of a slot."""

    def __init__(self, config: SlotConfig, host: docker.APIClient, timing: PoolTiming) -> None:
        self.config = config
        self.host = host
        self.timing = timing
        self._entries: list[_Entry] = []
        self._ready: list[_Entry] = []
        self._changed = anyio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing = anyio.Event()

    # --- opening and closing -------------------------------------------------------------

    async def open(self, capacity: int) -> None:
        """Remove this worker's leftovers, then warm ``capacity`` slots in parallel
        (at most ``warm_concurrency`` at once, ``warm_attempts`` tries each). Slots
        that fail to warm are reported and rebuilt in the background."""
        cfg = self.config
        removed = await anyio.to_thread.run_sync(
            lambda: remove_leftovers(self.host, cfg.prefix, cfg.worker_id, cfg.kill_attempts)
        )
        if removed:
            logger.warning(
                "worker %s: removed %d leftover containers/volumes of an earlier run: %s",
                cfg.worker_id,
                len(removed),
                ", ".join(removed[:10]),
            )
        self._entries = [_Entry(Slot(i, cfg, self.host)) for i in range(capacity)]
        limiter = anyio.CapacityLimiter(self.timing.warm_concurrency)
        async with anyio.create_task_group() as tg:
            for entry in self._entries:
                tg.start_soon(self._warm, entry, limiter)

        failed = [e for e in self._entries if e.state == SlotState.FAILED]
        for entry in failed:
            self._spawn(self._rebuild(entry, first_delay=True))
        logger.info(
            "worker %s: %d of %d docker slots warm%s",
            cfg.worker_id,
            capacity - len(failed),
            capacity,
            f"; failed to warm: {', '.join(e.slot.base_name for e in failed)} (retrying)"
            if failed
            else "",
        )
        self._spawn(self._watch_health())

    async def _warm(self, entry: _Entry, limiter: anyio.CapacityLimiter) -> None:
        attempts = self.timing.warm_attempts
        for attempt in range(1, attempts + 1):
            async with limiter:
                try:
                    await anyio.to_thread.run_sync(entry.slot.build)
                except (SandboxError, *DOCKER_ERRORS) as err:
                    entry.failures += 1
                    entry.set(SlotState.WARMING, str(err))
                    logger.warning(
                        "slot %s: warm-up attempt %d of %d failed: %s",
                        entry.slot.base_name,
                        attempt,
                        attempts,
                        err,
                    )
                else:
                    entry.failures = 0
                    await self._make_ready(entry)
                    return
            if attempt < attempts:
                await self._pause(self._delay(attempt))
        entry.set(SlotState.FAILED)

    async def close(self) -> None:
        """Stop background work and remove every slot (bounded attempts each).

        Resets and rebuilds in progress are let finish (they stop at their next
        pause) for up to ``close_grace_s``, then cancelled.
        """
        self._closed = True
        self._closing.set()
        async with self._changed:
            self._changed.notify_all()
        if self._tasks:
            with anyio.move_on_after(self.timing.close_grace_s):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        async with anyio.create_task_group() as tg:
            for entry in self._entries:
                tg.start_soon(self._destroy, entry)
        self._ready.clear()

    async def _destroy(self, entry: _Entry) -> None:
        if not await anyio.to_thread.run_sync(entry.slot.destroy):
            logger.error(
                "slot %s: container %s could not be removed; remove it by hand",
                entry.slot.base_name,
                entry.slot.container,
            )
        entry.set(SlotState.CLOSED)

    # --- lending -----------------------------------------------------------------------

    async def take(self) -> Slot:
        """Wait for a ready slot and mark it busy.

        Raises:
            SandboxError: if the pool is closed or no slot became ready in time.
        """
        with anyio.move_on_after(self.timing.take_timeout_s):
            while True:
                entry = await self._next_ready()
                if await anyio.to_thread.run_sync(entry.slot.healthy):
                    entry.set(SlotState.BUSY)
                    entry.jobs += 1
                    return entry.slot
                logger.warning(
                    "slot %s: found dead when handed out; rebuilding it", entry.slot.base_name
                )
                self._spawn(self._rebuild(entry))
        raise SandboxError(
            f"worker {self.config.worker_id}: no docker slot became ready within "
            f"{self.timing.take_timeout_s:g} s ({self.summary()})"
        )

    async def _next_ready(self) -> _Entry:
        async with self._changed:
            while not self._ready:
                if self._closed:
                    raise SandboxError(f"worker {self.config.worker_id}: the slot pool is closed")
                await self._changed.wait()
            entry = self._ready.pop(0)
            entry.set(SlotState.BUSY)
            return entry

    def give_back(self, slot: Slot, *, rebuild: bool, reason: str = "") -> None:
        """Return a slot after its job: reset it, or rebuild it when ``rebuild``;
        both happen in the background."""
        entry = self._entry(slot)
        if self._closed:
            return
        if rebuild:
            logger.info(
                "slot %s: rebuilding after its job (%s)", slot.base_name, reason or "unhealthy"
            )
            entry.set(SlotState.REBUILDING)
            self._spawn(self._rebuild(entry))
        else:
            entry.set(SlotState.RESETTING)
            self._spawn(self._reset(entry))

    async def _reset(self, entry: _Entry) -> None:
        slot = entry.slot
        started = time.monotonic()
        try:
            await anyio.to_thread.run_sync(slot.clean)
            await anyio.to_thread.run_sync(slot.refresh_lab_image)
            slot.oom_baseline = await anyio.to_thread.run_sync(slot.oom_kills)
        except (SandboxError, *DOCKER_ERRORS) as err:
            logger.warning("slot %s: reset failed, rebuilding it: %s", slot.base_name, err)
            entry.error = str(err)
            await self._rebuild(entry)
            return
        logger.info("slot %s: reset in %.2f s; ready", slot.base_name, time.monotonic() - started)
        await self._make_ready(entry)

    async def _rebuild(self, entry: _Entry, *, first_delay: bool = False) -> None:
        entry.set(SlotState.REBUILDING)
        slot = entry.slot
        attempt = 0
        while not self._closed:
            attempt += 1
            if first_delay or attempt > 1:
                delay = self._delay(entry.failures)
                logger.info("slot %s: next rebuild attempt in %.1f s", slot.base_name, delay)
                await self._pause(delay)
                if self._closed:
                    return
            try:
                if not await anyio.to_thread.run_sync(slot.destroy):
                    raise SandboxError(
                        f"slot {slot.base_name}: old container {slot.container} not removed"
                    )
                await anyio.to_thread.run_sync(slot.build)
            except (SandboxError, *DOCKER_ERRORS) as err:
                entry.failures += 1
                entry.error = str(err)
                logger.warning(
                    "slot %s: rebuild attempt %d failed: %s", slot.base_name, attempt, err
                )
                continue
            entry.failures = 0
            await self._make_ready(entry)
            return

    async def _make_ready(self, entry: _Entry) -> None:
        async with self._changed:
            entry.set(SlotState.READY)
            entry.error = ""
            self._ready.append(entry)
            self._changed.notify_all()

    async def _watch_health(self) -> None:
        while not self._closed:
            await self._pause(self.timing.health_interval_s)
            if self._closed:
                return
            for entry in list(self._ready):
                healthy = await anyio.to_thread.run_sync(entry.slot.healthy)
                if healthy or entry not in self._ready:
                    continue
                self._ready.remove(entry)
                logger.warning(
                    "slot %s: idle slot is dead (container or daemon gone); rebuilding",
                    entry.slot.base_name,
                )
                self._spawn(self._rebuild(entry))

    # --- helpers -----------------------------------------------------------------------

    async def _pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less when the pool closes."""
        with anyio.move_on_after(delay_s):
            await self._closing.wait()

    def _delay(self, failures: int) -> float:
        exponent = max(failures - 1, 0)
        return float(min(self.timing.backoff_s * (2**exponent), self.timing.backoff_max_s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "worker %s: docker slot background task failed",
                self.config.worker_id,
                exc_info=task.exception(),
            )

    def _entry(self, slot: Slot) -> _Entry:
        for entry in self._entries:
            if entry.slot is slot:
                return entry
        raise SandboxError(f"slot {slot.base_name}: not from this pool")

    def capacity(self) -> int:
        """Slots that can run jobs now or right after their reset."""
        return sum(1 for e in self._entries if e.state in _CAPACITY_STATES)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for entry in self._entries:
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no slots"

    def describe(self) -> list[dict[str, Any]]:
        """One dict per slot: index, state, container, port, jobs run, last error."""
        return [
            {
                "index": e.slot.index,
                "state": e.state.value,
                "container": e.slot.container,
                "port": e.slot.port,
                "bind": self.config.bind_address,
                "jobs": e.jobs,
                "failures": e.failures,
                "error": e.error,
                "since": e.since,
            }
            for e in self._entries
        ]
