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
import sys

from orbital.console import configure_logging
from orbital.errors import ConfigError
from orbital.settings import Settings, host_arch
from orbital.workers.service import queue_plan, serve

__all__ = ["main"]

logger = logging.getLogger("orbital.services.worker")


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


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT has drained it; return the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = Settings.from_env(**({"sandbox": args.sandbox} if args.sandbox else {}))
        plan = queue_plan(
            arch=args.arch, capacity=args.capacity, manager=args.manager,
            agent_capacity=args.agent_capacity, sync_capacity=args.sync_capacity, queues=args.queue,
        )  # fmt: skip
    except ConfigError as err:
        logger.error("worker service: cannot start: %s", err)
        return 2
    return serve(settings, plan, arch=args.arch, name=args.name, drain_timeout_s=args.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
