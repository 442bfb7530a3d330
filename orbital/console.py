"""What Orbital's programs share for talking to a terminal: plain tables and the
one log format every command and service configures.

The library itself never configures logging; programs (the CLI, services/)
call :func:`configure_logging` once at start.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["LOG_FORMAT", "configure_logging", "render_table"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int | str) -> None:
    """Send log lines to stderr in Orbital's format at ``level`` (a name or number).

    Raises:
        ValueError: for an unknown level name.
    """
    if isinstance(level, str):
        level = level.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(
                f"log level {level!r} is unknown: expected DEBUG, INFO, WARNING or ERROR"
            )
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def render_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Render rows as left-aligned columns under a header and a dashed rule."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
