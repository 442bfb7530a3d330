"""The outbox stream seen from the shipper: consumer group, settling, dead letters.

The outbox (``Keys.outbox``) is a Redis stream; each entry holds one CloudEvent.
The shipper reads it through the consumer group ``shipper`` (XREADGROUP), so
an entry it has read but not yet settled stays in the group's pending list. An
entry is *settled* once, in one MULTI: acknowledged and deleted after the
ingest API accepted it, or moved to the dead-letter list (``Keys.dead_letters``)
with the reason when the API refused it as invalid.

Only one shipper sends at a time: it holds a lock with a lease (other shippers
stand by). A new holder first takes over every pending entry of the group
(XAUTOCLAIM), whoever read it, and sends those before anything newer, so the
stream order, and with it each job's event order, is kept across a crash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis

from orbital.events.model import OUTBOX_FIELD, iso_time
from orbital.keys import Keys

__all__ = [
    "GROUP",
    "DeadLetter",
    "Outbox",
    "OutboxEntry",
    "ShipperLock",
    "dead_letter_records",
    "lock_key",
    "replay_dead_letters",
]

#: The consumer group every shipper reads the outbox through.
GROUP = "shipper"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REPLAY = """
local item = redis.call('LPOP', KEYS[1])
if not item then return false end
local record = cjson.decode(item)
return redis.call('XADD', KEYS[2], '*', ARGV[1], record.raw)
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One stream entry: its id and the event JSON exactly as stored.

    The JSON is parsed only when something needs a field (a dead letter, a log
    line): shipping sends the stored bytes unchanged, and parsing every event
    would cost as much as sending it.
    """

    stream_id: str
    raw: bytes

    @property
    def well_formed(self) -> bool:
        """Whether the entry holds something shaped like a JSON object. One that does
        not is dead-lettered unsent; one that only looks like it is refused by the API."""
        return self.raw[:1] == b"{" and self.raw[-1:] == b"}"

    @cached_property
    def event(self) -> dict[str, Any] | None:
        """The parsed event, or None when the entry is not a JSON object."""
        try:
            event = json.loads(self.raw)
        except ValueError:
            return None
        return event if isinstance(event, dict) else None

    @property
    def event_id(self) -> str:
        return str((self.event or {}).get("id", ""))

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class DeadLetter:
    """An entry the ingest API refused, and why."""

    entry: OutboxEntry
    reason: str
    status: int


def lock_key(keys: Keys) -> str:
    """The shipper lock's key (see :attr:`Keys.shipper_lock`)."""
    return keys.shipper_lock


class Outbox:
    """Reading and settling the outbox as one consumer of the shipper group."""

    def __init__(self, client: redis.Redis, keys: Keys, consumer: str) -> None:
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self._pending_first = True

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; a new group starts
        at the stream's first entry, so nothing written before it is skipped."""
        try:
            self.client.xgroup_create(self.keys.outbox, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def take_over(self) -> int:
        """Claim every pending entry of the group for this consumer, drop consumers
        left with nothing, and read pending entries before new ones. Call it only
        while holding the shipper lock. Returns how many entries were claimed from
        other consumers."""
        others = [c for c in self._consumers() if c["name"] != self.consumer]
        claimed = sum(int(c["pending"]) for c in others)
        start = "0-0"
        while claimed:
            # The whole pending list is walked once; entries already ours are
            # claimed again harmlessly. Idle time 0: the lock says their reader is gone.
            reply: list[Any] = _sync(
                self.client.xautoclaim(
                    self.keys.outbox, GROUP, self.consumer, 0, start_id=start, count=1000
                )
            )
            start = _text(reply[0])
            if start == "0-0":
                break
        for consumer in self._consumers():
            if consumer["name"] != self.consumer and not consumer["pending"]:
                self.client.xgroup_delconsumer(self.keys.outbox, GROUP, consumer["name"])
        self._pending_first = True
        return claimed

    def rewind(self) -> None:
        """Read this consumer's pending entries again before new ones (after a Redis
        error, a read may have been delivered to the group but not to us)."""
        self._pending_first = True

    def read(self, count: int, block_s: float) -> list[OutboxEntry]:
        """Return up to ``count`` entries in stream order: this consumer's pending
        entries first (left by an earlier run), then new ones, blocking up to
        ``block_s`` when there are none."""
        if self._pending_first:
            entries = self._read("0", count, None)
            if entries:
                return entries
            self._pending_first = False
        return self._read(">", count, max(1, int(block_s * 1000)))

    def settle(self, delivered: Sequence[OutboxEntry], dead: Sequence[DeadLetter] = ()) -> None:
        """In one MULTI: acknowledge and delete ``delivered``, and move ``dead`` to the
        dead-letter list with their reasons."""
        ids = [e.stream_id for e in delivered] + [d.entry.stream_id for d in dead]
        if not ids:
            return
        now = iso_time(time.time())
        pipe = self.client.pipeline(transaction=True)
        for letter in dead:
            pipe.rpush(self.keys.dead_letters, _dead_record(letter, now))
        pipe.xack(self.keys.outbox, GROUP, *ids)
        pipe.xdel(self.keys.outbox, *ids)
        pipe.execute()

    def backlog(self) -> int:
        """Entries in the outbox, sent or not yet settled included."""
        return int(_sync(self.client.xlen(self.keys.outbox)))

    def _read(self, start: str, count: int, block_ms: int | None) -> list[OutboxEntry]:
        reply: list[Any] | None = _sync(
            self.client.xreadgroup(
                GROUP, self.consumer, {self.keys.outbox: start}, count=count, block=block_ms
            )
        )
        entries: list[OutboxEntry] = []
        gone: list[str] = []
        for _stream, items in reply or []:
            for stream_id, fields in items:
                if not fields:  # deleted from the stream while pending
                    gone.append(_text(stream_id))
                    continue
                entries.append(_entry(_text(stream_id), fields))
        if gone:
            self.client.xack(self.keys.outbox, GROUP, *gone)
        return entries

    def _consumers(self) -> list[dict[str, Any]]:
        try:
            rows: list[dict[str, Any]] = _sync(self.client.xinfo_consumers(self.keys.outbox, GROUP))
        except redis.ResponseError:
            return []
        return [{"name": _text(r["name"]), "pending": int(r["pending"])} for r in rows]


class ShipperLock:
    """The lease that lets one shipper at a time send.

    Args:
        client: the Redis client (a renewing thread should use its own).
        keys: the installation's keys.
        owner: a value unique to this holder (consumer name plus a random part).
        ttl_s: the lease; renew it at least every third of this.
    """

    def __init__(self, client: redis.Redis, keys: Keys, owner: str, ttl_s: float) -> None:
        self.client = client
        self.key = lock_key(keys)
        self.owner = owner
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lock if it is free; True if this holder has it now."""
        if self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        """Extend the lease if this holder still has it."""
        return bool(self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.owner])

    def holder(self) -> str:
        value = self.client.get(self.key)
        return _text(value) if value is not None else ""


def replay_dead_letters(client: redis.Redis, keys: Keys, limit: int | None = None) -> int:
    """Move dead letters back into the outbox (oldest first), e.g. after fixing
    what made the ingest API refuse them; return how many moved. Each move is
    atomic: an event is never in both places or in neither."""
    script = client.register_script(_REPLAY)
    moved = 0
    while limit is None or moved < limit:
        if script(keys=[keys.dead_letters, keys.outbox], args=[OUTBOX_FIELD]) is None:
            break
        moved += 1
    return moved


def dead_letter_records(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Return the dead-letter list, oldest first, as dicts (``reason``, ``status``,
    ``event_id``, ``stream_id``, ``dead_at``, ``raw``)."""
    items: list[bytes] = _sync(client.lrange(keys.dead_letters, 0, -1))
    return [json.loads(item) for item in items]


def _dead_record(letter: DeadLetter, now_iso: str) -> str:
    return json.dumps(
        {
            "reason": letter.reason,
            "status": letter.status,
            "event_id": letter.entry.event_id,
            "stream_id": letter.entry.stream_id,
            "dead_at": now_iso,
            "raw": letter.entry.raw.decode("utf-8", "replace"),
        }
    )


def _entry(stream_id: str, fields: dict[Any, Any]) -> OutboxEntry:
    raw = fields.get(OUTBOX_FIELD.encode(), fields.get(OUTBOX_FIELD))
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes):  # no e field: keep what there is for the dead letter
        raw = json.dumps({_text(k): _text(v) for k, v in fields.items()}).encode()
        return OutboxEntry(stream_id, b"fields " + raw)
    return OutboxEntry(stream_id, raw)


def _sync(reply: Any) -> Any:
    """A blocking client's reply (redis-py types every command as maybe-awaitable)."""
    return reply


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
