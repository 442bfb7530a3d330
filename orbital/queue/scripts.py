"""The Lua scripts behind every atomic queue step, loaded once per client.

Each script is ``prelude.lua`` followed by its own body; both sync and asyncio
clients register the same text, so EVALSHA is used after the first call.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from importlib import resources

__all__ = ["SCRIPT_NAMES", "clock_args", "script_source"]

SCRIPT_NAMES = (
    "enqueue",
    "promote",
    "start",
    "renew",
    "finish",
    "cancel",
    "reap",
    "update",
    "handback",
)


@cache
def script_source(name: str) -> str:
    """Return the full Lua source of one script (prelude included)."""
    lua = resources.files("orbital.queue") / "lua"
    prelude = (lua / "prelude.lua").read_text()
    return prelude + "\n" + (lua / f"{name}.lua").read_text()


def clock_args(prefix: str, now: float) -> list[str]:
    """The first three ARGV of every script: prefix, epoch seconds, ISO 8601 time."""
    iso = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return [prefix, repr(now), iso.replace("+00:00", "Z")]
