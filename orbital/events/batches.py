"""Cutting the outbox into request bodies, and reading the per-event errors of a 400.

Pure functions on :class:`~orbital.events.outbox.OutboxEntry` sequences, kept apart
from the shipper's loop so each rule can be read (and tested) on its own. A body is
the stored event JSON, unchanged, joined into one array, so what Dynatrace receives
is byte for byte what the state change wrote.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from orbital.events.outbox import OutboxEntry

__all__ = ["batch_body", "chunk_end", "halves", "per_event_errors"]


def batch_body(chunk: Sequence[OutboxEntry]) -> bytes:
    """The request body: the stored event JSON, unchanged, as one array."""
    return b"[" + b",".join(e.raw for e in chunk) + b"]"


def chunk_end(entries: Sequence[OutboxEntry], start: int, max_bytes: int) -> int:
    """The end of the chunk starting at ``start``: as many consecutive entries as fit a
    body of ``max_bytes`` (at least one: an event larger than that travels alone)."""
    size = 2 + entries[start].size
    end = start + 1
    while end < len(entries) and size + 1 + entries[end].size <= max_bytes:
        size += 1 + entries[end].size
        end += 1
    return end


def halves(chunk: Sequence[OutboxEntry]) -> tuple[Sequence[OutboxEntry], Sequence[OutboxEntry]]:
    """Split a chunk of two or more entries in two, keeping the order."""
    middle = len(chunk) // 2
    return chunk[:middle], chunk[middle:]


def per_event_errors(body: bytes, chunk: Sequence[OutboxEntry]) -> dict[int, str]:
    """Map the per-event errors of a 400 answer (``{"errors": [{"index": 3,
    "message": ...}]}``; an ``id`` is used when there is no index) to positions in
    ``chunk``. Empty when the answer carries no usable per-event detail."""
    try:
        errors = json.loads(body).get("errors") if body else None
    except (ValueError, AttributeError):
        return {}
    if not isinstance(errors, list):
        return {}
    by_id = {e.event_id: i for i, e in enumerate(chunk)}
    found: dict[int, str] = {}
    for error in errors:
        if not isinstance(error, dict):
            continue
        index = error.get("index")
        if not (isinstance(index, int) and 0 <= index < len(chunk)):
            index = by_id.get(str(error.get("id", "")))
        if index is not None:
            found[index] = str(error.get("message") or "refused as invalid")[:500]
    return found
