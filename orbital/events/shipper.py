"""The shipper: sends the outbox to the Dynatrace business-events API in batches.

One batch at a time, in stream order, so a job's events arrive in the order
they happened and a batch being retried holds back everything after it. What
happens to a batch depends on the answer:

* 2xx: its entries are acknowledged and deleted (never before);
* 429, 5xx, no answer: sent again after an exponential backoff with jitter, or
  after ``Retry-After`` when the API gives one, for as long as it takes;
* 400 with per-event errors: Dynatrace accepted the valid events, so those are
  settled as delivered and the refused ones go to the dead-letter list with the
  API's reason; 400 without per-event detail: the request as a whole was
  refused, so the batch is split in halves until the refused events are alone
  (the good ones still go), and a single refused event is dead-lettered;
* 413: split in halves and sent again (a single event that is still too large
  is dead-lettered); later batches are kept under the refused size;
* anything else (401, 403, 404...): a configuration problem; nothing is
  dropped, the batch is retried at the maximum backoff with an ERROR line.

Delivery is exactly once as far as Orbital can see: an accepted batch is never
sent again. Two windows remain where the receiver gets a batch twice, both
inherent to HTTP without an idempotency key: the shipper dies (or loses Redis
for good) between the 2xx and the acknowledgement, or a request times out
after Dynatrace processed it. Each event keeps its stable CloudEvent id, so a
query can drop such duplicates (``dedup id``).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import redis.exceptions

from orbital.connection import resolve_redis_url, sync_client
from orbital.events.batches import batch_body, chunk_end, halves, per_event_errors
from orbital.events.ingest import IngestClient, IngestResponse
from orbital.events.outbox import DeadLetter, Outbox, OutboxEntry, ShipperLock
from orbital.keys import Keys
from orbital.settings import Settings

__all__ = ["Shipper", "ShipperStats"]

logger = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
#: A Retry-After longer than this is treated as a server mistake.
_MAX_RETRY_AFTER_S = 3600.0
_REPORT_EVERY_S = 60.0
_WAIT_SLICE_S = 0.25


@dataclass
class ShipperStats:
    """Counters since the shipper started."""

    delivered: int = 0
    dead: int = 0
    requests: int = 0
    retries: int = 0
    splits: int = 0


class _Interrupted(Exception):
    """The shipper was asked to stop, or lost its lock, in the middle of a batch."""


class Shipper:
    """Sends the outbox of one installation to Dynatrace until stopped.

    Args:
        settings: ``dt_environment``, ``dt_api_token`` and the ``shipper_*`` fields.
        client: a blocking Redis client (default: one for ``settings``).
        ingest: the HTTP client (default: one for ``settings``).
        rng: jitter source returning floats in [0, 1).

    Raises:
        ConfigError: if the Dynatrace URL or token is missing or unusable.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: redis.Redis | None = None,
        ingest: IngestClient | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.ingest = ingest or IngestClient(
            settings.dt_environment, settings.dt_api_token, settings.shipper_timeout_s
        )
        self._own_client = client is None
        self.client = client or sync_client(resolve_redis_url(settings))
        self.name = settings.shipper_name or socket.gethostname()
        self.outbox = Outbox(self.client, self.keys, self.name)
        owner = f"{self.name}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lock = ShipperLock(self.client, self.keys, owner, settings.shipper_lock_ttl_s)
        self.stats = ShipperStats()
        self._rng = rng
        self._max_bytes = settings.shipper_max_batch_bytes
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._leading = False
        self._renewed_at = 0.0
        self._standby_logged = False
        self._reported = (time.monotonic(), 0, 0)

    # lifecycle --------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return: a batch being retried stays in the outbox."""
        self._stop.set()

    def run(self) -> ShipperStats:
        """Ship until :meth:`stop` is called; return the counters. A shipper runs
        once: make a new one to start again."""
        logger.info(
            "shipper %s: starting: outbox %s -> %s, batches of up to %d events / %d bytes",
            self.name,
            self.keys.outbox,
            self.ingest.url,
            self.settings.shipper_batch_size,
            self._max_bytes,
        )
        renewer = threading.Thread(target=self._renew_loop, name="shipper-lock", daemon=True)
        renewer.start()
        try:
            self._redis_retry(self.outbox.ensure_group)
            while not self._stop.is_set():
                self._step()
        finally:
            self._stop.set()
            renewer.join()
            self._shutdown()
        return self.stats

    def _step(self) -> None:
        try:
            if not self._lead():
                return
            entries = self.outbox.read(
                self.settings.shipper_batch_size, self.settings.shipper_poll_s
            )
            if entries:
                self._deliver(entries)
            self._report()
        except _Interrupted:
            return
        except redis.exceptions.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            logger.warning(
                "shipper %s: the outbox or its consumer group was deleted; recreating the group",
                self.name,
            )
            self.outbox.ensure_group()
            self.outbox.rewind()
        except _REDIS_ERRORS as err:
            self.outbox.rewind()
            delay = min(5.0, self.settings.shipper_backoff_max_s)
            logger.warning(
                "shipper %s: Redis unavailable (%s); retrying in %.1f s", self.name, err, delay
            )
            self._stop.wait(delay)

    def _shutdown(self) -> None:
        left = -1
        try:
            left = self.outbox.backlog()
            if self._leading:
                self.lock.release()
        except _REDIS_ERRORS as err:
            logger.warning(
                "shipper %s: could not release its lock (%s); it expires by itself", self.name, err
            )
        self.ingest.close()
        if self._own_client:
            self.client.close()
        logger.info(
            "shipper %s: stopped: %d delivered, %d dead-lettered, %d request(s); %s event(s) "
            "left in the outbox for the next run",
            self.name,
            self.stats.delivered,
            self.stats.dead,
            self.stats.requests,
            left if left >= 0 else "unknown",
        )

    # the lock ---------------------------------------------------------------
    def _lead(self) -> bool:
        if self._leading and not self._lost.is_set():
            return True
        if self._leading:
            logger.warning(
                "shipper %s: lost its lock (Redis unreachable or paused past %.0f s); its "
                "unsettled batch goes to whoever holds the lock; standing by",
                self.name,
                self.settings.shipper_lock_ttl_s,
            )
            self._leading = False
        if self.lock.acquire():
            self._lost.clear()
            self._renewed_at = time.monotonic()
            # Leading starts once the earlier shippers' entries are ours: sending
            # anything newer first would break the stream order.
            claimed = self.outbox.take_over()
            self._leading = True
            self._standby_logged = False
            logger.info(
                "shipper %s: holds the lock and sends; took over %d unsettled event(s) of "
                "earlier shippers; %d event(s) in the outbox",
                self.name,
                claimed,
                self.outbox.backlog(),
            )
            return True
        if not self._standby_logged:
            logger.info(
                "shipper %s: standing by: %s holds the lock; trying again every %.1f s",
                self.name,
                self.lock.holder() or "another shipper",
                self.settings.shipper_lock_ttl_s / 3,
            )
            self._standby_logged = True
        self._stop.wait(self.settings.shipper_lock_ttl_s / 3)
        return False

    def _renew_loop(self) -> None:
        ttl_s = self.settings.shipper_lock_ttl_s
        while not self._stop.wait(ttl_s / 3):
            if not self._leading or self._lost.is_set():
                continue
            try:
                held = self.lock.renew()
            except _REDIS_ERRORS:
                held = time.monotonic() - self._renewed_at < ttl_s
            else:
                if held:
                    self._renewed_at = time.monotonic()
            if not held:
                self._lost.set()

    # one batch ----------------------------------------------------------------
    def _deliver(self, entries: list[OutboxEntry]) -> None:
        broken = [e for e in entries if not e.well_formed]
        if broken:
            self._settle(
                [], [DeadLetter(e, "outbox entry is not a JSON object", 0) for e in broken]
            )
        sendable = [e for e in entries if e.well_formed]
        start = 0
        while start < len(sendable):
            # Cut each chunk with the current limit: a 413 may have just lowered it.
            end = chunk_end(sendable, start, self._max_bytes)
            self._send(sendable[start:end])
            start = end

    def _send(self, chunk: Sequence[OutboxEntry]) -> None:
        attempt = 0
        while True:
            self._check()
            body = batch_body(chunk)
            response = self.ingest.post(body)
            self.stats.requests += 1
            if response.accepted:
                # Dynatrace has these events now. Should this process die before the
                # acknowledgement below reaches Redis, the next shipper sends this one
                # batch again; the stable event ids let queries drop the repeats.
                self._settle(chunk, [])
                logger.debug(
                    "shipper %s: %d event(s) accepted (%s)",
                    self.name,
                    len(chunk),
                    response.describe(),
                )
                return
            if response.status == 413:
                self._too_large(chunk, len(body))
                return
            if response.status == 400:
                self._refused(chunk, response)
                return
            attempt += 1
            self.stats.retries += 1
            self._wait(self._retry_delay(chunk, response, attempt))

    def _too_large(self, chunk: Sequence[OutboxEntry], size: int) -> None:
        if len(chunk) == 1:
            reason = f"HTTP 413: the event alone is too large ({size} bytes)"
            self._settle([], [DeadLetter(chunk[0], reason, 413)])
            return
        self._max_bytes = max(1, min(self._max_bytes, size // 2))
        self.stats.splits += 1
        logger.warning(
            "shipper %s: a batch of %d events (%d bytes) is too large (HTTP 413); sending it "
            "in halves, and later batches stay under %d bytes",
            self.name,
            len(chunk),
            size,
            self._max_bytes,
        )
        for half in halves(chunk):
            self._send(half)

    def _refused(self, chunk: Sequence[OutboxEntry], response: IngestResponse) -> None:
        errors = per_event_errors(response.body, chunk)
        if errors:
            # Dynatrace accepted the valid events of this request: settle them as
            # delivered; sending them again would duplicate them.
            dead = [DeadLetter(chunk[i], f"HTTP 400: {errors[i]}", 400) for i in sorted(errors)]
            self._settle([e for i, e in enumerate(chunk) if i not in errors], dead)
            return
        if len(chunk) == 1:
            reason = f"HTTP 400: {self._excerpt(response.body) or 'invalid event'}"
            self._settle([], [DeadLetter(chunk[0], reason, 400)])
            return
        # No per-event detail: the request was refused as a whole, so nothing in it
        # was accepted. Halve until each refused event is alone; the rest still go.
        self.stats.splits += 1
        logger.warning(
            "shipper %s: a batch of %d events was refused (HTTP 400) without per-event "
            "errors; sending it in halves to find the invalid event(s)",
            self.name,
            len(chunk),
        )
        for half in halves(chunk):
            self._send(half)

    def _retry_delay(
        self, chunk: Sequence[OutboxEntry], response: IngestResponse, attempt: int
    ) -> float:
        settings = self.settings
        transient = response.status in (0, 429) or response.status >= 500
        if response.retry_after_s is not None:
            delay = min(response.retry_after_s, _MAX_RETRY_AFTER_S)
            why = f"Retry-After {response.retry_after_s:g} s"
        else:
            ceiling = settings.shipper_backoff_max_s
            if transient:
                ceiling = min(ceiling, settings.shipper_backoff_s * 2 ** (attempt - 1))
            delay = ceiling / 2 + self._rng() * ceiling / 2
            why = "backoff with jitter"
        detail = self._excerpt(response.body)
        if transient:
            logger.warning(
                "shipper %s: %d event(s) from %s: %s%s; retry %d in %.2f s (%s); later events wait",
                self.name,
                len(chunk),
                chunk[0].event_id,
                response.describe(),
                f" {detail!r}" if detail else "",
                attempt,
                delay,
                why,
            )
        else:
            logger.error(
                "shipper %s: %d event(s) from %s: %s%s: check dt_environment and that the token "
                "has the bizevents.ingest scope; nothing is dropped; retry %d in %.2f s",
                self.name,
                len(chunk),
                chunk[0].event_id,
                response.describe(),
                f" {detail!r}" if detail else "",
                attempt,
                delay,
            )
        return delay

    # settling, waiting ---------------------------------------------------------
    def _settle(self, delivered: Sequence[OutboxEntry], dead: Sequence[DeadLetter]) -> None:
        """Record the outcome. After a 2xx this must not give up: a batch that is not
        acknowledged is sent again by the next run."""
        delay = 0.1
        attempts_after_stop = 3
        while True:
            try:
                self.outbox.settle(delivered, dead)
                break
            except _REDIS_ERRORS as err:
                if self._stop.is_set():
                    attempts_after_stop -= 1
                    if attempts_after_stop <= 0:
                        logger.error(
                            "shipper %s: stopping with %d accepted event(s) not acknowledged "
                            "(Redis: %s); the next run sends them again",
                            self.name,
                            len(delivered),
                            err,
                        )
                        raise _Interrupted from None
                logger.warning(
                    "shipper %s: cannot record %d accepted event(s) in Redis (%s); retrying in "
                    "%.1f s, without sending them again",
                    self.name,
                    len(delivered),
                    err,
                    delay,
                )
                time.sleep(delay)
                delay = min(self.settings.shipper_backoff_max_s, delay * 2)
        self.stats.delivered += len(delivered)
        self.stats.dead += len(dead)
        for letter in dead:
            logger.error(
                "shipper %s: event %s (outbox entry %s) moved to the dead-letter list: %s",
                self.name,
                letter.entry.event_id or "?",
                letter.entry.stream_id,
                letter.reason,
            )

    def _wait(self, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        while True:
            self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, _WAIT_SLICE_S))

    def _check(self) -> None:
        if self._stop.is_set() or self._lost.is_set():
            raise _Interrupted

    def _redis_retry(self, func: Callable[[], object]) -> None:
        while not self._stop.is_set():
            try:
                func()
                return
            except _REDIS_ERRORS as err:
                logger.warning(
                    "shipper %s: Redis unavailable (%s); retrying in 1 s", self.name, err
                )
                self._stop.wait(1.0)

    def _report(self) -> None:
        since, delivered, dead = self._reported
        now = time.monotonic()
        if now - since < _REPORT_EVERY_S:
            return
        sent, refused = self.stats.delivered - delivered, self.stats.dead - dead
        if sent or refused:
            logger.info(
                "shipper %s: %d event(s) delivered and %d dead-lettered in the last %.0f s; "
                "%d in the outbox",
                self.name,
                sent,
                refused,
                now - since,
                self.outbox.backlog(),
            )
        self._reported = (now, self.stats.delivered, self.stats.dead)

    def _excerpt(self, body: bytes) -> str:
        """A short, printable piece of a response body for a log line or a reason
        (the token is cut out, should a proxy ever echo the request)."""
        text = body[:300].decode("utf-8", "replace").replace("\n", " ").strip()
        token = self.settings.dt_api_token
        return text.replace(token, "***") if token else text
