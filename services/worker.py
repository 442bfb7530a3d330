"""The worker service: runs lab jobs, and with ``--manager`` agent and sync jobs too.

Run it with the same configuration as every Orbital process (``ORBITAL_*``
variables, optionally ``ORBITAL_CONFIG``); a worker on another machine needs
nothing but the shared ``ORBITAL_REDIS_URL`` (and ``ORBITAL_PREFIX`` if changed).
Options choose what this process serves::

    python services/worker.py                          # test:<this arch> x2
    python services/worker.py --capacity 4 --sandbox docker
    python services/worker.py --manager                # + agent x1 and sync x1
    python services/worker.py --queue agent=2 --queue sync=1

SIGTERM or SIGINT drains it: no new claims, running jobs get ``--drain-timeout``
seconds to finish, then go back to their queues for another worker.

Exit status: 0 after a clean stop, 1 after a crash (logged with its traceback), 2
when the configuration is unusable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.parse

import anyio

from orbital.agents.manager import manager_handlers
from orbital.connection import resolve_redis_url
from orbital.errors import ConfigError
from orbital.jobs import JobType
from orbital.sandboxes.select import make_provider
from orbital.settings import Settings, host_arch
from orbital.workers import Worker, WorkerConfig

__all__ = ["main", "queue_plan"]

logger = logging.getLogger("orbital.services.worker")


def queue_plan(args: argparse.Namespace) -> dict[str, int]:
    """The queues this worker serves and its capacity on each.

    Raises:
        ConfigError: for a ``--queue`` item that is not ``name`` or ``name=N``.
    """
    if args.queue:
        plan = {}
        for item in args.queue:
            name, _, number = item.partition("=")
            if not name or (number and not number.isdigit()) or number == "0":
                raise ConfigError(f"--queue {item!r}: expected a queue name, or name=N with N >= 1")
            plan[name] = int(number or args.capacity)
        return plan
    plan = {f"test:{args.arch}": args.capacity}
    if args.manager:
        plan[JobType.AGENT.value] = args.agent_capacity
        plan[JobType.SYNC.value] = args.sync_capacity
    return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run an Orbital worker until SIGTERM.")
    parser.add_argument("--arch", default=host_arch(), help="arch whose test queue to serve")
    parser.add_argument("--capacity", type=int, default=2, help="lab jobs at once")
    parser.add_argument(
        "--manager", action="store_true", help="also serve the agent and sync queues"
    )
    parser.add_argument(
        "--agent-capacity", type=int, default=1, help="agent jobs at once (--manager)"
    )
    parser.add_argument(
        "--sync-capacity", type=int, default=1, help="sync jobs at once (--manager)"
    )
    parser.add_argument("--sandbox", choices=["local", "docker"], default=None,
                        help="where lab steps run (default: ORBITAL_SANDBOX, else local)")  # fmt: skip
    parser.add_argument("--name", default="", help="stable worker id (a restart recovers its jobs)")
    parser.add_argument(
        "--queue", action="append", default=[], help="serve this queue (name or name=N) instead"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds running jobs get on SIGTERM"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def _where(url: str) -> str:
    """The Redis URL without credentials, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT has drained it; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A service reads nothing from its terminal; an agent CLI that finds stdin open
    # would wait on it. (systemd gives /dev/null already; a shell may not.)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    try:
        settings = Settings.from_env(**({"sandbox": args.sandbox} if args.sandbox else {}))
        plan = queue_plan(args)
        redis_url = resolve_redis_url(settings)
        provider = make_provider(settings, settings.sandbox, args.name or None)
        config = WorkerConfig(
            arch=args.arch, capacity=plan, name=args.name, drain_timeout_s=args.drain_timeout,
            handlers=manager_handlers(settings),
        )  # fmt: skip
        worker = Worker(settings, config, provider, redis_url=redis_url)
    except ConfigError as err:
        logger.error("worker service: cannot start: %s", err)
        return 2

    queues = ", ".join(f"{name}x{n}" for name, n in sorted(plan.items()))
    logger.info(
        "worker service: starting worker %s: queues %s, Redis %s, prefix %s, sandbox %s",
        worker.worker_id, queues, _where(redis_url), settings.prefix, settings.sandbox,
    )  # fmt: skip
    try:
        anyio.run(worker.run)
    except Exception:
        logger.exception("worker service: worker %s crashed; its claimed jobs return to their queues "
                         "when its lease expires", worker.worker_id)  # fmt: skip
        return 1
    logger.info("worker service: worker %s exited cleanly", worker.worker_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
