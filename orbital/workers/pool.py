"""The worker: claim loops per queue, leases, heartbeat, reaper, graceful drain.

One :class:`Worker` process serves one or more queues, each with its own
capacity. A claim loop first takes a free slot and only then blocks on its
queue (BLMOVE into the worker's claimed list), so the worker never holds more
jobs than it can run and the queue length in Redis stays the true backlog.

Every running job has a lease renewed every ``renew_interval_s``; the renewal
also notices a cancel. A job whose lease is lost (the worker was paused past
the lease and the reaper handed the job to someone else) is killed at once and
its results are discarded by the fencing token, so the two runs never both
write.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import redis.asyncio
import redis.exceptions

from orbital.connection import async_client
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import AsyncQueue
from orbital.sandboxes.base import SandboxProvider
from orbital.settings import Settings
from orbital.workers.registration import Registration, new_worker_id
from orbital.workers.runner import JobContext, JobHandler, JobResult, run_lab_job

__all__ = ["Worker", "WorkerConfig"]

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_MAX_BACKOFF_S = 5.0


@dataclass
class WorkerConfig:
    """How one worker runs.

    Args:
        arch: the architecture this worker's lab queues serve.
        capacity: queue name -> how many jobs of it may run at once.
        name: a stable worker id (optional); see :func:`new_worker_id`.
        claim_timeout_s: how long one BLMOVE blocks before the loop looks around.
        drain_timeout_s: on SIGTERM, how long running jobs may finish before they
            are handed back to their queue.
        renew_interval_s: lease renewal and cancel check period (default: a third
            of the lease, at most one second).
        reap_interval_s: how often this worker runs the reaper and promotes due
            delayed jobs.
    """

    arch: str
    capacity: Mapping[str, int]
    name: str = ""
    claim_timeout_s: float = 1.0
    drain_timeout_s: float = 60.0
    renew_interval_s: float | None = None
    reap_interval_s: float = 1.0
    handlers: dict[JobType, JobHandler] = field(default_factory=dict)


@dataclass
class _Running:
    job: Job
    token: str
    scope: anyio.CancelScope
    ctx: JobContext | None = None
    reason: str = ""  # why the scope was cancelled: cancelled, lost, timed_out, drain


class Worker:
    """A worker process's engine. ``await worker.run()`` until drained."""

    def __init__(
        self,
        settings: Settings,
        config: WorkerConfig,
        provider: SandboxProvider,
        client: redis.asyncio.Redis | None = None,
        redis_url: str = "",
    ) -> None:
        self.settings = settings
        self.config = config
        self.provider = provider
        self.worker_id = new_worker_id(config.arch, config.name)
        self.keys = Keys(settings.prefix)
        self._client = client
        self._redis_url = redis_url or settings.redis_url
        self._running: dict[str, _Running] = {}
        self._draining = anyio.Event()
        self._stopped = anyio.Event()
        self._claim_done = anyio.Event()
        self.handlers: dict[JobType, JobHandler] = {
            JobType.INTEGRATION_TEST: run_lab_job,
            JobType.UNIT_TEST: run_lab_job,
            JobType.DAEMON: run_lab_job,
            **config.handlers,
        }
        self.registration = Registration(
            self.worker_id, config.arch, dict(config.capacity), provider.describe()
        )
        lease_third = settings.lease_s / 3
        self.renew_interval_s = config.renew_interval_s or min(1.0, lease_third)

    # lifecycle ------------------------------------------------------------
    def drain(self) -> None:
        """Stop claiming; let running jobs finish (up to the drain timeout)."""
        if not self._draining.is_set():
            logger.info(
                "worker %s: draining: no new claims; %d running job(s) get %.0f s to finish, "
                "then go back to their queues",
                self.worker_id,
                len(self._running),
                self.config.drain_timeout_s,
            )
            self._draining.set()

    @property
    def running_job_ids(self) -> list[str]:
        return sorted(self._running)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve the configured queues until drained (SIGTERM/SIGINT or :meth:`drain`)."""
        client = self._client or async_client(self._redis_url)
        self.queue = AsyncQueue(client, self.settings)
        self.client = client
        try:
            async with anyio.create_task_group() as tg:
                # Signals first: a SIGTERM during warm-up or registration drains.
                if handle_signals:
                    await tg.start(self._watch_signals)
                # Only lab queues use sandboxes: agent and sync jobs need no warm slot.
                lab_slots = sum(n for q, n in self.config.capacity.items() if q.startswith("test:"))
                await self.provider.open(lab_slots)
                if not await self._start_up():
                    tg.cancel_scope.cancel()
                    return
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._reaper_loop)
                tg.start_soon(self._drain_deadline)
                async with anyio.create_task_group() as jobs:
                    for queue, capacity in self.config.capacity.items():
                        slots = anyio.Semaphore(self.provider.ready_capacity(capacity))
                        jobs.start_soon(self._claim_loop, queue, slots, jobs)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop(client)

    async def _start_up(self) -> bool:
        """Recover this worker's old claims and register, retrying while Redis is
        away; False if the worker was told to stop before it got that far."""
        delay = 0.2
        while True:
            if self._draining.is_set():
                logger.info(
                    "worker %s: stopped before Redis answered; nothing to hand back", self.worker_id
                )
                return False
            try:
                await self._recover_own_claims()
                await self._heartbeat_once("ready")
                break
            except _REDIS_ERRORS as err:
                logger.warning(
                    "worker %s: Redis unreachable at start (%s); retrying in %.1f s",
                    self.worker_id, err, delay,
                )  # fmt: skip
                with anyio.move_on_after(delay):
                    await self._draining.wait()
                delay = min(_MAX_BACKOFF_S, delay * 2)
        logger.info(
            "worker %s: ready: arch %s, queues %s, sandbox %s",
            self.worker_id,
            self.config.arch,
            ", ".join(f"{q}x{n}" for q, n in sorted(self.config.capacity.items())),
            self.provider.describe().get("kind"),
        )
        return True

    async def _stop(self, client: redis.asyncio.Redis) -> None:
        self.registration.status = "stopped"
        try:
            await self.registration.withdraw(client, self.keys)
        except _REDIS_ERRORS as err:
            logger.warning(
                "worker %s: could not withdraw its registration: %s", self.worker_id, err
            )
        await self.provider.close()
        if self._client is None:
            await client.aclose()
        self._stopped.set()
        logger.info("worker %s: stopped", self.worker_id)

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                logger.info("worker %s: got %s", self.worker_id, signal.Signals(signum).name)
                self.drain()

    async def _drain_deadline(self) -> None:
        await self._draining.wait()
        with anyio.move_on_after(self.config.drain_timeout_s):
            while self._running:
                await anyio.sleep(0.1)
            return
        for run in self._running.values():
            run.reason = run.reason or "drain"
            run.scope.cancel()

    async def _recover_own_claims(self) -> None:
        """A worker restarted under the same name finds its old claims and hands
        them back at once, instead of waiting for its old registration to expire."""
        claimed = await self.client.lrange(self.keys.claimed(self.worker_id), 0, -1)  # type: ignore[misc]
        if claimed:
            await self.client.delete(self.keys.worker(self.worker_id))
            report = await self.queue.reap()
            logger.warning(
                "worker %s: found %d job(s) claimed by its previous run; requeued %d, lost %d",
                self.worker_id,
                len(claimed),
                report.count("requeued"),
                report.count("lost"),
            )

    # background loops -----------------------------------------------------
    async def _heartbeat_once(self, status: str | None = None, *, emit_event: bool = False) -> None:
        if status:
            self.registration.status = status
        self.registration.active_jobs = {j: r.job.queue for j, r in self._running.items()}
        self.registration.sandbox = self.provider.describe()  # warm and failed slots change
        await self.registration.publish(
            self.client, self.keys, self.settings.heartbeat_ttl_s, emit_event=emit_event
        )

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ttl_s / 3
        beats = 0
        while True:
            await anyio.sleep(interval)
            status = "draining" if self._draining.is_set() else "ready"
            beats += 1
            # worker.heartbeat goes out every Nth beat, not on each one.
            emit_event = beats % self.settings.heartbeat_event_every == 0
            try:
                await self._heartbeat_once(status, emit_event=emit_event)
            except _REDIS_ERRORS as err:
                logger.warning(
                    "worker %s: heartbeat failed (%s); retrying in %.1f s",
                    self.worker_id,
                    err,
                    interval,
                )

    async def _reaper_loop(self) -> None:
        while True:
            try:
                await self.queue.promote_due()
                await self.queue.reap()
            except _REDIS_ERRORS as err:
                logger.warning(
                    "worker %s: reaper pass failed (%s); next pass in %.1f s",
                    self.worker_id,
                    err,
                    self.config.reap_interval_s,
                )
            await anyio.sleep(self.config.reap_interval_s)

    async def _claim_loop(
        self, queue: str, slots: anyio.Semaphore, jobs: anyio.abc.TaskGroup
    ) -> None:
        backoff = 0.1
        while not self._draining.is_set():
            if not await self._take_slot(slots):
                return
            try:
                # Shielded: a BLMOVE cut off after the server moved the id would leave
                # the job in our claimed list without anyone running it.
                with anyio.CancelScope(shield=True):
                    job_id = await self.queue.claim(
                        queue, self.worker_id, self.config.claim_timeout_s
                    )
            except _REDIS_ERRORS as err:
                slots.release()
                logger.warning(
                    "worker %s: cannot claim from %s (%s); reconnecting in %.1f s",
                    self.worker_id,
                    queue,
                    err,
                    backoff,
                )
                await anyio.sleep(backoff)
                backoff = min(_MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = 0.1
            if job_id is None:
                slots.release()
                continue
            jobs.start_soon(self._run_claimed, job_id, slots)

    async def _take_slot(self, slots: anyio.Semaphore) -> bool:
        """Wait for a free slot; False (and no slot held) once the worker drains."""
        if self._draining.is_set():
            return False
        if slots.value > 0:
            # A free slot: take it without starting a watcher task.
            slots.acquire_nowait()
            return True
        async with anyio.create_task_group() as tg:

            async def stop_on_drain() -> None:
                await self._draining.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_on_drain)
            await slots.acquire()
            tg.cancel_scope.cancel()
            if self._draining.is_set():
                slots.release()
                return False
            return True
        return False

    # one job ----------------------------------------------------------------
    async def _run_claimed(self, job_id: str, slots: anyio.Semaphore) -> None:
        try:
            await self._run_job(job_id)
        except Exception:
            logger.exception(
                "worker %s: job %s crashed the worker's job task", self.worker_id, job_id
            )
        finally:
            slots.release()

    async def _run_job(self, job_id: str) -> None:
        token = secrets.token_hex(8)
        outcome, detail, job = await self.queue.start(job_id, self.worker_id, token)
        if job is None:
            logger.info(
                "worker %s: job %s was %s before it started; skipped",
                self.worker_id,
                job_id,
                detail or outcome,
            )
            return
        queue_wait = float(detail)
        timeout_s = job.timeout_s or self.settings.job_timeout_s
        run = _Running(job, token, anyio.CancelScope(deadline=anyio.current_time() + timeout_s))
        self._running[job_id] = run
        logger.info(
            "worker %s: job %s started: %s %s %s@%s (attempt %d, waited %.2f s)",
            self.worker_id,
            job_id,
            job.type,
            job.repo,
            job.branch,
            job.arch,
            job.attempts,
            queue_wait,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, run)
                result = await self._execute(run, queue_wait)
                tg.cancel_scope.cancel()
            await self._finish(run, result)
        finally:
            del self._running[job_id]

    async def _execute(self, run: _Running, queue_wait: float) -> JobResult:
        ctx = JobContext(
            job=run.job,
            token=run.token,
            worker_id=self.worker_id,
            settings=self.settings,
            queue=self.queue,
            client=self.client,
            keys=self.keys,
            provider=self.provider,
            queue_wait_s=queue_wait,
            cancel_scope=run.scope,
        )
        run.ctx = ctx
        handler = self.handlers.get(run.job.type)
        if handler is None:
            return JobResult.error(
                f"worker {self.worker_id} has no handler for job type {run.job.type}"
            )
        with run.scope:
            try:
                return await handler(ctx)
            except Exception as err:
                # A handler bug ends this job as error instead of leaving it to be
                # reaped and retried into the same crash.
                logger.exception(
                    "worker %s: job %s: handler for %s failed; recording error",
                    self.worker_id,
                    run.job.id,
                    run.job.type,
                )
                return JobResult.error(f"{type(err).__name__}: {err}")
        # Reached only when the scope was cancelled: cancel, timeout, lost lease or drain.
        return ctx.interrupted(run.reason or "timed_out")

    async def _keep_lease(self, run: _Running) -> None:
        last_ok = time.monotonic()
        while True:
            await anyio.sleep(self.renew_interval_s)
            try:
                status = await self.queue.renew(run.job.id, self.worker_id, run.token)
            except _REDIS_ERRORS as err:
                silent_s = time.monotonic() - last_ok
                if silent_s > self.settings.lease_s:
                    logger.error(
                        "worker %s: job %s: Redis unreachable for %.0f s, past the lease; "
                        "killing the job since another worker may take it",
                        self.worker_id,
                        run.job.id,
                        silent_s,
                    )
                    run.reason = "lost"
                    run.scope.cancel()
                    return
                logger.warning(
                    "worker %s: job %s: lease renewal failed (%s); retrying",
                    self.worker_id,
                    run.job.id,
                    err,
                )
                continue
            last_ok = time.monotonic()
            if status == "ok":
                if run.ctx is not None and run.ctx.sandbox is not None:
                    await run.ctx.sandbox.lease_renewed()
                continue
            if run.reason:
                continue  # already killing it; keep the lease while it dies
            run.reason = "cancelled" if status == "cancelled" else "lost"
            logger.warning(
                "worker %s: job %s %s; killing its processes",
                self.worker_id,
                run.job.id,
                "was cancelled" if status == "cancelled" else "lost its lease to another worker",
            )
            run.scope.cancel()
            if status == "lost":
                return

    async def _finish(self, run: _Running, result: JobResult) -> None:
        job = run.job
        if run.reason == "lost":
            logger.warning(
                "worker %s: job %s: results discarded (lease lost)", self.worker_id, job.id
            )
            return
        if run.reason == "drain":
            outcome = await self._retry(self.queue.handback, job.id, self.worker_id, run.token)
            logger.info(
                "worker %s: job %s handed back while draining: %s", self.worker_id, job.id, outcome
            )
            return
        outcome, state = await self._retry(
            self.queue.finish,
            job.id,
            self.worker_id,
            run.token,
            result.state,
            build=result.build,
            fields=result.fields,
            events=result.events,
        )
        elapsed = time.time() - (job.started_at or time.time())
        logger.info(
            "worker %s: job %s ended %s after %.1f s (%s)",
            self.worker_id,
            job.id,
            state or result.state,
            elapsed,
            outcome,
        )

    async def _retry(self, func: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Retry a final write through a Redis outage until it lands (or the lease
        logic elsewhere has given up on the job)."""
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                return await func(*args, **kwargs)
            except _REDIS_ERRORS as err:
                logger.warning(
                    "worker %s: final write for a job failed (%s); retry %d in %.1f s",
                    self.worker_id,
                    err,
                    attempt,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(_MAX_BACKOFF_S, delay * 2)
