"""The GitHub webhook receiver: an aiohttp application on one port.

Routes:

* ``POST /webhook`` takes a delivery. It answers 413 when the body is over
  ``webhook_max_body_bytes`` (from Content-Length before reading, or as soon as a
  chunked body passes the limit; the rest is never buffered), then 415/401/400
  from :func:`~orbital.github.delivery.parse_delivery`, 422 for an invalid
  identifier, 200 for a ping or a duplicate delivery id, 202 when jobs were
  enqueued or the event was ignored (the body says which), and 503 when Redis
  cannot be reached (the delivery is then not marked accepted).
* ``GET /healthz`` answers 200 ``{"status": "ok"}`` when Redis answers and 503
  otherwise; it says nothing about jobs, deliveries or configuration.

The event loop only reads, verifies and decodes; planning and Redis work run in a
small thread pool, so a slow Redis never stalls other connections. The receiver
only enqueues, so an answer normally takes a few milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from aiohttp import web

from orbital.connection import resolve_redis_url
from orbital.errors import ConfigError, WebhookRejectedError
from orbital.github.delivery import parse_delivery
from orbital.github.intake import Intake, Outcome
from orbital.github.planner import FleetSource
from orbital.github.routing import DEFAULT_TABLE, RoutingTable, load_routing_table
from orbital.github.signature import SIGNATURE_HEADER
from orbital.settings import Settings

__all__ = ["WebhookService", "build_app", "check_settings", "run_service", "serve"]

logger = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024
_THREADS = 8
_T = TypeVar("_T")


def check_settings(settings: Settings) -> None:
    """Refuse configurations the receiver must not run with.

    Raises:
        ConfigError: when no webhook secret is set.
    """
    if not settings.webhook_secret.strip():
        raise ConfigError(
            "webhook_secret is empty: set ORBITAL_WEBHOOK_SECRET to the secret configured "
            "on the GitHub webhook; the receiver refuses to start without it, since it "
            "could not tell GitHub's deliveries from forged ones"
        )


class WebhookService:
    """The receiver's state: its settings, the intake, and the worker threads.

    Args:
        settings: must carry a webhook secret (see :func:`check_settings`).
        intake: plans and records deliveries; built from ``settings`` when omitted.

    Raises:
        ConfigError: from :func:`check_settings`, or for an unusable routing file.
    """

    def __init__(self, settings: Settings, intake: Intake | None = None) -> None:
        check_settings(settings)
        self.settings = settings
        self.secret = settings.webhook_secret.encode("utf-8")
        self.max_body = settings.webhook_max_body_bytes
        self.intake = intake or _make_intake(settings)
        self.executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="webhook")
        self._refusals = _RefusalLog()

    def close(self) -> None:
        """Wait for running Redis work, then close the Redis connections."""
        self._refusals.flush()
        self.executor.shutdown(wait=True)
        self.intake.client.close()

    async def _in_thread(self, func: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(func, *args))

    async def webhook(self, request: web.Request) -> web.Response:
        """Handle ``POST /webhook``."""
        peer = request.remote or "?"
        try:
            body = await self._read_body(request)
            delivery = parse_delivery(
                secret=self.secret,
                content_type=request.headers.get("Content-Type", ""),
                signatures=request.headers.getall(SIGNATURE_HEADER, []),
                event=request.headers.get("X-GitHub-Event"),
                delivery_id=request.headers.get("X-GitHub-Delivery"),
                body=body,
            )
            outcome = await self._in_thread(self.intake.handle, delivery)
        except WebhookRejectedError as err:
            self._refusals.note(peer, err)
            return _reply(Outcome(err.status, {"status": "rejected", "reason": err.reason}))
        except redis.RedisError as err:
            logger.error("webhook from %s: Redis failed (%s: %s); answered 503 so GitHub "
                         "shows the delivery as failed and it can be redelivered",
                         peer, type(err).__name__, err)  # fmt: skip
            return _reply(Outcome(503, {"status": "unavailable", "reason": "queue unavailable"}))
        except Exception:
            logger.exception("webhook from %s: unexpected failure; answered 500", peer)
            return _reply(Outcome(500, {"status": "error", "reason": "internal error"}))
        return _reply(outcome)

    async def health(self, request: web.Request) -> web.Response:
        """Handle ``GET /healthz``: Redis answers or not, nothing else."""
        try:
            await self._in_thread(self.intake.client.ping)
        except redis.RedisError as err:
            logger.warning("health check: Redis does not answer (%s); answered 503", err)
            return web.json_response({"status": "unavailable"}, status=503)
        return web.json_response({"status": "ok"})

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, at most ``max_body`` bytes; 413 as soon as it is known to be more."""
        too_big = WebhookRejectedError(413, f"body over the {self.max_body}-byte limit")
        if request.content_length is not None and request.content_length > self.max_body:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)


class _RefusalLog:
    """Logs refused deliveries, at most one line per status per second: a flood of
    forged or broken requests becomes one line a second with a count, not a line each.
    401s are warnings (a wrong secret or a forger); the rest are informational."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[int, float] = {}
        self._held: dict[int, int] = {}

    def note(self, peer: str, err: WebhookRejectedError) -> None:
        now = self.clock()
        if now - self._last.get(err.status, -self.interval_s) < self.interval_s:
            self._held[err.status] = self._held.get(err.status, 0) + 1
            return
        self._last[err.status] = now
        held = self._held.pop(err.status, 0)
        more = f" (and {held} more refused with {err.status} since the last line)" if held else ""
        level = logging.WARNING if err.status == 401 else logging.INFO
        logger.log(level, "webhook from %s refused with %d: %s; nothing enqueued%s",
                   peer, err.status, err.reason, more)  # fmt: skip

    def flush(self) -> None:
        """Log the counts still held back (at shutdown)."""
        for status, held in sorted(self._held.items()):
            logger.info("webhook: %d more deliveries were refused with %d", held, status)
        self._held.clear()


def _reply(outcome: Outcome) -> web.Response:
    return web.json_response(outcome.body, status=outcome.status)


def _make_intake(settings: Settings) -> Intake:
    table: RoutingTable = DEFAULT_TABLE
    if settings.webhook_routing_file:
        table = load_routing_table(settings.webhook_routing_file)
    # Short timeouts: an answer that waits on a stalled Redis for long is worse than a
    # 503 that GitHub records as a failed, redeliverable delivery.
    client = redis.Redis.from_url(
        resolve_redis_url(settings),
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        max_connections=_THREADS * 2,
    )
    return Intake(client, settings, table, FleetSource(settings.fleet_file))


def build_app(service: WebhookService) -> web.Application:
    """The aiohttp application with the receiver's two routes."""
    app = web.Application(client_max_size=service.max_body + 1)
    app.router.add_post("/webhook", service.webhook)
    app.router.add_get("/healthz", service.health)
    return app


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    service: WebhookService | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Run the receiver until ``stop`` is set, then finish in-flight requests.

    Raises:
        ConfigError: when the configuration is refused (no secret, bad routing file).
        OSError: when the port cannot be bound.
    """
    service = service or WebhookService(settings)
    runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.webhook_host, settings.webhook_port, backlog=1024)
        await site.start()
        table = service.intake.table
        logger.info(
            "webhook receiver listening on http://%s:%d/webhook: routing table %s (%d rules), "
            "fleet registry %s; stops on SIGTERM",
            settings.webhook_host, settings.webhook_port, table.source, len(table.rules),
            settings.fleet_file or "none (no builds)",
        )  # fmt: skip
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result
        await stop.wait()
        logger.info("webhook receiver stopping: finishing in-flight deliveries")
    finally:
        await runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, service.close)
    logger.info("webhook receiver stopped")


def run_service(settings: Settings) -> None:
    """Run the receiver in this process until SIGTERM or SIGINT.

    Raises:
        ConfigError: when the configuration is refused (before anything listens).
    """
    service = WebhookService(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop, service=service)

    asyncio.run(main())
