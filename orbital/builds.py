"""Build records and their history: by time, by repository, by triple; the
triage queue; pass rates.

Records are written by the worker's finish script together with the job's end
(see ``queue/lua/prelude.lua``: ``index_build``), so a build is indexed exactly
once. Every query here is a sorted-set range read: O(log n + k), never a scan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from orbital.keys import Keys, triple
from orbital.results import Step

__all__ = ["BuildHistory", "BuildRecord", "TriageEntry"]


@dataclass
class BuildRecord:
    """What one lab run did, step by step."""

    job_id: str
    type: str
    repo: str
    branch: str
    arch: str
    status: str
    trigger: str = ""
    commit: str = ""
    commit_sha: str = ""
    framework_version: str = ""
    nightly_id: str = ""
    worker: str = ""
    attempts: int = 0
    steps: list[Step] = field(default_factory=list)
    failed_step: str = ""
    failure_summary: str = ""
    problems: list[str] = field(default_factory=list)
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    queue_wait_s: float = 0.0
    setup_s: float = 0.0
    run_s: float = 0.0
    log_path: str = ""
    sandbox: dict[str, Any] = field(default_factory=dict)

    @property
    def triple(self) -> str:
        return triple(self.repo, self.branch, self.arch)

    @property
    def duration_s(self) -> float:
        if self.finished_at and self.started_at:
            return self.finished_at - self.started_at
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [s.to_dict() for s in self.steps]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        # cjson writes an empty Lua table as {}: treat it as an empty list.
        kwargs["steps"] = [Step.from_dict(s) for s in (data.get("steps") or [])]
        kwargs["problems"] = list(data.get("problems") or [])
        kwargs["sandbox"] = dict(data.get("sandbox") or {})
        for key in (
            "job_id",
            "type",
            "repo",
            "branch",
            "arch",
            "status",
            "commit",
            "commit_sha",
            "nightly_id",
            "worker",
            "trigger",
        ):
            kwargs[key] = kwargs.get(key) or ""
        return cls(**kwargs)


@dataclass(frozen=True)
class TriageEntry:
    """A triple that keeps failing, with its consecutive failure count."""

    repo: str
    branch: str
    arch: str
    consecutive_failures: int
    last_build: BuildRecord | None


class BuildHistory:
    """Read side of the build records."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def get(self, job_id: str) -> BuildRecord | None:
        raw = cast(bytes | None, self.client.get(self.keys.build(job_id)))
        return None if raw is None else BuildRecord.from_dict(json.loads(raw))

    def _records(self, ids: Iterable[bytes | str]) -> list[BuildRecord]:
        ids = list(ids)
        if not ids:
            return []
        raws = cast(list[bytes | None], self.client.mget([self.keys.build(_s(i)) for i in ids]))
        return [BuildRecord.from_dict(json.loads(r)) for r in raws if r is not None]

    def _range(self, key: str, limit: int, since: float | None) -> list[BuildRecord]:
        low = "-inf" if since is None else since
        ids = self.client.zrevrangebyscore(key, "+inf", low, start=0, num=limit)
        return self._records(ids)

    def recent(self, limit: int = 50, *, since: float | None = None) -> list[BuildRecord]:
        """The newest builds of the whole fleet, newest first."""
        return self._range(self.keys.builds_all, limit, since)

    def for_repo(
        self, repo: str, limit: int = 50, *, since: float | None = None
    ) -> list[BuildRecord]:
        """The newest builds of one repository (``owner/name``), newest first."""
        return self._range(self.keys.builds_repo(repo), limit, since)

    def for_triple(self, repo: str, branch: str, arch: str, limit: int = 50) -> list[BuildRecord]:
        """The newest builds of one repository + branch + arch, newest first."""
        return self._range(self.keys.builds_triple(triple(repo, branch, arch)), limit, None)

    def count(self) -> int:
        return int(cast(int, self.client.zcard(self.keys.builds_all)))

    def pass_rate(
        self, window_s: float, *, repo: str | None = None, now: float | None = None
    ) -> float | None:
        """Share of builds that passed among those that ended in the last
        ``window_s`` seconds (None when there were none)."""
        low = (now or time.time()) - window_s
        if repo is None:
            total_key, passed_key = self.keys.builds_all, self.keys.builds_passed
        else:
            total_key, passed_key = self.keys.builds_repo(repo), self.keys.builds_repo_passed(repo)
        total = int(cast(int, self.client.zcount(total_key, low, "+inf")))
        if not total:
            return None
        return int(cast(int, self.client.zcount(passed_key, low, "+inf"))) / total

    def triage(self, limit: int = 50) -> list[TriageEntry]:
        """Triples failing in a row, worst first, each with its latest build."""
        rows = cast(
            list[tuple[bytes, float]],
            self.client.zrevrange(self.keys.triage, 0, limit - 1, withscores=True),
        )
        entries = []
        for member, score in rows:
            repo, branch, arch = _s(member).split("|")
            latest = self.for_triple(repo, branch, arch, limit=1)
            entries.append(
                TriageEntry(repo, branch, arch, int(score), latest[0] if latest else None)
            )
        return entries

    def consecutive_failures(self, repo: str, branch: str, arch: str) -> int:
        score = cast(float | None, self.client.zscore(self.keys.triage, triple(repo, branch, arch)))
        return int(score or 0)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
