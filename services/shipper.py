"""The event shipper service: sends the Redis outbox to Dynatrace business events.

Run it with the same configuration as every Orbital process (``ORBITAL_*``
variables, optionally ``ORBITAL_CONFIG``), plus ``ORBITAL_DT_ENVIRONMENT`` and
``ORBITAL_DT_API_TOKEN``. Several shippers may run (on different machines):
one sends, the others stand by and take over when it dies. SIGTERM or SIGINT
stops it cleanly; a batch that was being retried stays in the outbox for the
next run.

Exit status: 0 after a clean stop, 1 after a crash (logged with its traceback), 2
when the configuration is unusable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from orbital.console import configure_logging
from orbital.errors import ConfigError
from orbital.events import Shipper
from orbital.settings import Settings

__all__ = ["main"]

logger = logging.getLogger("orbital.services.shipper")


def main(argv: list[str] | None = None) -> int:
    """Run the shipper until SIGTERM/SIGINT; return the exit status."""
    parser = argparse.ArgumentParser(description="Ship Orbital's event outbox to Dynatrace.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    try:
        settings = Settings.from_env()
        if not settings.dt_environment:
            raise ConfigError(
                "dt_environment (ORBITAL_DT_ENVIRONMENT) is empty: set it to the Dynatrace "
                "environment URL, e.g. https://abc12345.live.dynatrace.com"
            )
        shipper = Shipper(settings)
    except ConfigError as err:
        logger.error("event shipper: cannot start: %s", err)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("event shipper: got %s; stopping", signal.Signals(signum).name)
        shipper.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        shipper.run()
    except Exception:
        logger.exception("event shipper: crashed; unsent events stay in the outbox")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
