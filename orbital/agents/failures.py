"""What the build history says about a failing lab, for fix-ci and diagnose.

fix-ci and diagnose act only when the same repository + branch + arch has
failed at least ``diagnose_min_failures`` times in a row (the triage index the
finish script keeps). Agent jobs carry no arch of their own: when the job does
not name one, the arch with the longest failure streak is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from orbital.builds import BuildHistory, BuildRecord
from orbital.errors import LogError
from orbital.ids import ARCHES
from orbital.keys import Keys
from orbital.logs import read_log

__all__ = ["FailureContext", "read_failure_context"]

logger = logging.getLogger(__name__)

_RECENT_BUILDS = 10


@dataclass(frozen=True)
class FailureContext:
    """The failing triple's streak and its last failed build (with its log tail)."""

    repo: str
    branch: str
    arch: str
    consecutive_failures: int
    build: BuildRecord | None = None
    log_tail: str = ""

    @property
    def triple_text(self) -> str:
        return f"{self.repo} {self.branch} {self.arch}".strip()


def read_failure_context(
    client: redis.Redis,
    keys: Keys,
    repo: str,
    branch: str,
    arch: str = "",
    *,
    build_job_id: str = "",
    tail_bytes: int = 12_000,
) -> FailureContext:
    """Return the failure streak of ``repo`` ``branch`` on ``arch`` (or on the arch
    with the longest streak), the last failed build and the end of its log.

    Args:
        build_job_id: use this build instead of the triple's last failed one.
        tail_bytes: how much of the build's log to return.
    """
    history = BuildHistory(client, keys)
    arches = [arch] if arch else list(ARCHES)
    streaks = {a: history.consecutive_failures(repo, branch, a) for a in arches}
    chosen = max(arches, key=lambda a: streaks[a])

    build = history.get(build_job_id) if build_job_id else None
    if build is None:
        recent = history.for_triple(repo, branch, chosen, _RECENT_BUILDS)
        build = next((b for b in recent if b.status != "passed"), None)
    tail = _log_tail(client, keys, build.job_id, tail_bytes) if build else ""
    return FailureContext(repo, branch, chosen, streaks[chosen], build, tail)


def _log_tail(client: redis.Redis, keys: Keys, job_id: str, tail_bytes: int) -> str:
    try:
        data = read_log(client, keys, job_id)
    except LogError as err:
        logger.info(
            "build %s: no log tail for the agent prompt (%s); continuing without it", job_id, err
        )
        return ""
    tail = data[-tail_bytes:]
    newline = tail.find(b"\n")
    if len(data) > tail_bytes and 0 <= newline < len(tail) - 1:
        tail = tail[newline + 1 :]  # start at a whole line
    return tail.decode("utf-8", errors="replace")
