"""Running a worker as a long-lived program: the queue plan, start-up, exit status.

Both ``orbital worker`` and ``services/worker.py`` call :func:`serve`, so the
command line and the systemd service behave the same.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Sequence

import anyio

from orbital.agents.manager import manager_handlers
from orbital.connection import resolve_redis_url
from orbital.errors import ConfigError, SandboxError
from orbital.jobs import JobType
from orbital.sandboxes.select import make_provider
from orbital.settings import Settings
from orbital.workers.pool import Worker, WorkerConfig

__all__ = ["queue_plan", "serve"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2


def queue_plan(
    *,
    arch: str,
    capacity: int,
    manager: bool = False,
    agent_capacity: int = 1,
    sync_capacity: int = 1,
    queues: Sequence[str] = (),
) -> dict[str, int]:
    """The queues a worker serves and its capacity on each.

    ``queues`` (``name`` or ``name=N``) replaces the default plan, which is the
    arch's test queue, plus the agent and sync queues for a manager.

    Raises:
        ConfigError: for a queue item that is not ``name`` or ``name=N`` with N >= 1.
    """
    if queues:
        plan = {}
        for item in queues:
            name, _, number = item.partition("=")
            if not name or (number and not number.isdigit()) or number == "0":
                raise ConfigError(f"--queue {item!r}: expected a queue name, or name=N with N >= 1")
            plan[name] = int(number or capacity)
        return plan
    plan = {f"test:{arch}": capacity}
    if manager:
        plan[JobType.AGENT.value] = agent_capacity
        plan[JobType.SYNC.value] = sync_capacity
    return plan


def _first(err: BaseException, kind: type[SandboxError]) -> SandboxError | None:
    """``err`` or the first ``kind`` inside it (task groups wrap errors in groups)."""
    if isinstance(err, kind):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None


def _where(url: str) -> str:
    """The Redis URL without credentials, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def serve(
    settings: Settings,
    plan: dict[str, int],
    *,
    arch: str,
    name: str = "",
    drain_timeout_s: float = 60.0,
) -> int:
    """Run a worker until SIGTERM/SIGINT has drained it; return the exit status
    (0 clean stop, 1 crash, 2 unusable configuration)."""
    # A worker reads nothing from its terminal, and neither may its jobs.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    try:
        redis_url = resolve_redis_url(settings)
        provider = make_provider(settings, settings.sandbox, name or None)
        config = WorkerConfig(
            arch=arch, capacity=plan, name=name, drain_timeout_s=drain_timeout_s,
            handlers=manager_handlers(settings),
        )  # fmt: skip
        worker = Worker(settings, config, provider, redis_url=redis_url)
    except ConfigError as err:
        logger.error("worker: cannot start: %s", err)
        return EXIT_CONFIG

    logger.info(
        "worker %s: starting: queues %s, Redis %s, prefix %s, sandbox %s",
        worker.worker_id, ", ".join(f"{q}x{n}" for q, n in sorted(plan.items())),
        _where(redis_url), settings.prefix, settings.sandbox,
    )  # fmt: skip
    try:
        anyio.run(worker.run)
    except Exception as err:
        sandbox_error = _first(err, SandboxError)
        if sandbox_error is not None:
            logger.error(
                "worker %s: its sandbox cannot be used: %s", worker.worker_id, sandbox_error
            )
            return EXIT_CONFIG
        logger.exception(
            "worker %s crashed; its claimed jobs return to their queues when its lease expires",
            worker.worker_id,
        )
        return EXIT_CRASH
    logger.info("worker %s: exited cleanly", worker.worker_id)
    return EXIT_OK
