"""The scheduler service: plans the nightly run and queues the hourly drift check.

Every ``scheduler_tick_s`` seconds (30 by default) it asks Redis whether the
latest ``nightly_cron`` slot has been planned (``Scheduler.fire_if_due``) and
whether the latest ``sync_cron`` slot has its drift job (``enqueue_drift_if_due``).
Each slot is claimed once in Redis, so several schedulers (a standby on another
machine) or a restart never plan a night twice. The nightly's jobs are stored as
delayed jobs; workers promote them when due, so nothing here sleeps until 2 am.

Run it with the same configuration as every Orbital process (``ORBITAL_*``
variables, optionally ``ORBITAL_CONFIG``), with ``ORBITAL_FLEET_FILE`` for the
nightly. ``--once`` does one pass and exits (for a systemd timer instead of the
long-running service). SIGTERM or SIGINT stops it between passes.

Exit status: 0 after a clean stop, 1 after a crash (logged with its traceback), 2
when the configuration is unusable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from types import FrameType

import redis

from orbital.connection import resolve_redis_url, sync_client
from orbital.console import configure_logging
from orbital.errors import ConfigError, FleetError
from orbital.fleet import load_fleet
from orbital.queue import Queue
from orbital.scheduler import Scheduler, next_nightly
from orbital.settings import Settings
from orbital.sync.schedule import enqueue_drift_if_due, next_drift

__all__ = ["SchedulerService", "main"]

logger = logging.getLogger("orbital.services.scheduler")

_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class SchedulerService:
    """One scheduler process: passes every ``tick_s`` until :meth:`stop`."""

    def __init__(
        self, settings: Settings, client: redis.Redis, *, nightly: bool, drift: bool
    ) -> None:
        self.settings = settings
        self.client = client
        self.queue = Queue(client, settings)
        self.scheduler = Scheduler(client, settings, self.queue)
        self.nightly = nightly and bool(settings.fleet_file)
        self.drift = drift and bool(settings.sync_cron)
        self._stopping = threading.Event()
        self._last_problem = ""

    def stop(self) -> None:
        """Finish the current pass and return from :meth:`run`."""
        self._stopping.set()

    def run(self, tick_s: float, *, once: bool = False) -> None:
        """Pass every ``tick_s`` seconds until stopped (or once)."""
        while not self._stopping.is_set():
            self.tick()
            if once:
                return
            self._stopping.wait(tick_s)

    def tick(self, now: float | None = None) -> None:
        """One pass: plan the nightly and queue the drift job if their slots are due.
        A problem (Redis down, a broken registry) is logged when it first appears and
        the next pass tries again."""
        try:
            if self.nightly:
                fleet = load_fleet(self.settings.fleet_file)
                run = self.scheduler.fire_if_due(fleet, now)
                if run is not None:
                    logger.info("scheduler: nightly %s planned: %d job(s)", run.run_id, run.total)
            if self.drift:
                enqueue_drift_if_due(self.client, self.settings, self.queue, now)
        except (FleetError, ConfigError) as err:
            self._problem(f"the registry or schedule is unusable ({err}); retrying every pass")
        except _REDIS_ERRORS as err:
            self._problem(f"Redis is unreachable ({err}); retrying every pass")
        else:
            if self._last_problem:
                logger.info("scheduler: recovered; passes work again")
            self._last_problem = ""

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            logger.error("scheduler: %s", text)
        self._last_problem = text


def main(argv: list[str] | None = None) -> int:
    """Run the scheduler until SIGTERM/SIGINT; return the exit status."""
    parser = argparse.ArgumentParser(description="Plan Orbital's nightly runs and drift checks.")
    parser.add_argument("--once", action="store_true", help="do one pass and exit")
    parser.add_argument("--tick", type=float, default=None, help="seconds between passes")
    parser.add_argument("--no-nightly", action="store_true", help="do not plan nightly runs")
    parser.add_argument("--no-drift", action="store_true", help="do not queue drift checks")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    try:
        settings = Settings.from_env()
        next_nightly(settings.nightly_cron, time.time())  # refuses a bad cron now, not at 2 am
        client = sync_client(resolve_redis_url(settings))
        service = SchedulerService(
            settings, client, nightly=not args.no_nightly, drift=not args.no_drift
        )
        if service.drift:
            next_drift(settings.sync_cron, time.time())
    except ConfigError as err:
        logger.error("scheduler service: cannot start: %s", err)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info(
            "scheduler service: got %s; stopping after this pass", signal.Signals(signum).name
        )
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tick_s = args.tick or settings.scheduler_tick_s
    nightly = (
        f"nightly {settings.nightly_cron!r}"
        if service.nightly
        else "no nightly (no fleet_file or --no-nightly)"
    )
    drift = f"drift {settings.sync_cron!r}" if service.drift else "no drift checks"
    logger.info(
        "scheduler service: started: %s, %s, a pass every %.0f s, prefix %s",
        nightly, drift, tick_s, settings.prefix,
    )  # fmt: skip
    try:
        service.run(tick_s, once=args.once)
    except Exception:
        logger.exception("scheduler service: crashed; a restart resumes where it left off")
        return 1
    finally:
        client.close()
    logger.info("scheduler service: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
