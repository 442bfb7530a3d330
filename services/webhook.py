"""The GitHub webhook receiver service: verifies deliveries and enqueues their jobs.

Run it with the same configuration as every Orbital process (``ORBITAL_*``
variables, optionally ``ORBITAL_CONFIG``), plus ``ORBITAL_WEBHOOK_SECRET`` (it
refuses to start without one) and, as needed, ``ORBITAL_WEBHOOK_HOST``,
``ORBITAL_WEBHOOK_PORT``, ``ORBITAL_WEBHOOK_ROUTING_FILE`` and
``ORBITAL_FLEET_FILE``. Point GitHub's webhook at ``http(s)://HOST:PORT/webhook``
(content type JSON or form; both are verified over the raw body) through a TLS
proxy; ``/healthz`` is for the load balancer. Several receivers may run behind one
proxy: duplicate deliveries and "once" jobs are decided in Redis.

Every log line is masked for the configured secret values and token shapes.
SIGTERM or SIGINT stops it after in-flight deliveries are answered.

Exit status: 0 after a clean stop, 2 when the configuration is unusable or the
port cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orbital.console import configure_logging
from orbital.errors import ConfigError
from orbital.masking import mask_text
from orbital.settings import Settings

__all__ = ["BadRequestFilter", "MaskingFilter", "main"]

logger = logging.getLogger("orbital.services.webhook")


class MaskingFilter(logging.Filter):
    """Masks secret values and token shapes in every record a handler emits."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        # A filter that raises would raise inside the logging call; a record that cannot
        # be formatted is replaced by a note instead (it may hold a secret).
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            masked = mask_text(message, self.secrets)
        except Exception as err:
            masked = f"(unprintable log record from {record.name}: {type(err).__name__})"
        record.msg, record.args = masked, None
        record.exc_info, record.exc_text = None, None
        return True


class BadRequestFilter(logging.Filter):
    """Turns aiohttp's traceback for a request that is not valid HTTP (answered 400
    before any handler runs) into one warning line, so a burst of junk cannot flood
    the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._shorten(record)
        except Exception:  # never let the log call itself fail
            logging.getLogger(__name__).debug("could not shorten %r", record.msg)
        return True

    def _shorten(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        status = getattr(error, "code", None)
        if error is not None and status == 400 and type(error).__module__.startswith("aiohttp"):
            lines = str(getattr(error, "message", "")).strip().splitlines()
            what = lines[0][:200] if lines else "not valid HTTP"
            record.msg, record.args = f"{record.getMessage()}; answered 400: {what}", None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None


def main(argv: list[str] | None = None) -> int:
    """Run the receiver until SIGTERM/SIGINT; return the exit status."""
    parser = argparse.ArgumentParser(description="Receive GitHub webhooks and enqueue jobs.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    try:
        settings = Settings.from_env()
        for handler in logging.getLogger().handlers:
            handler.addFilter(MaskingFilter(settings.secret_values()))
        logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
        # Imported here so a missing webhook extra is reported, not a traceback.
        from orbital.github.app import run_service
    except ConfigError as err:
        logger.error("webhook receiver: cannot start: %s", err)
        return 2
    except ImportError as err:
        logger.error("webhook receiver: cannot start: %s; install orbital[webhook]", err)
        return 2

    try:
        run_service(settings)
    except ConfigError as err:
        logger.error("webhook receiver: cannot start: %s", err)
        return 2
    except OSError as err:
        logger.error(
            "webhook receiver: cannot listen on %s:%d: %s",
            settings.webhook_host, settings.webhook_port, err,
        )  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
