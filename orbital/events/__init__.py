"""Business events: the CloudEvent model, the Redis outbox and the shipper to Dynatrace."""

from __future__ import annotations

from orbital.events.ingest import BATCH_CONTENT_TYPE, INGEST_PATH, IngestClient, IngestResponse
from orbital.events.model import (
    aemit,
    cloud_event,
    emit,
    encode,
    heartbeat_event,
    iso_time,
    job_event,
    join_fields,
)
from orbital.events.outbox import (
    GROUP,
    DeadLetter,
    Outbox,
    OutboxEntry,
    ShipperLock,
    dead_letter_records,
    replay_dead_letters,
)
from orbital.events.shipper import Shipper, ShipperStats

__all__ = [
    "BATCH_CONTENT_TYPE",
    "GROUP",
    "INGEST_PATH",
    "DeadLetter",
    "IngestClient",
    "IngestResponse",
    "Outbox",
    "OutboxEntry",
    "Shipper",
    "ShipperLock",
    "ShipperStats",
    "aemit",
    "cloud_event",
    "dead_letter_records",
    "emit",
    "encode",
    "heartbeat_event",
    "iso_time",
    "job_event",
    "join_fields",
    "replay_dead_letters",
]
