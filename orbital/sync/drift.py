"""Framework-version drift: each repository's declared version against the target.

::

    target: framework_target_version, else the newest v* tag of framework_repo
            (git ls-remote --tags through git_url_template)
    each repo: shallow clone of its branch, tree only ─> check out .devcontainer
               ─> the version framework_version_from reads ─> compare
    status: up-to-date | behind | ahead | unknown (with the reason)

Git runs in a :class:`~orbital.agents.workspace.Workspace` (process groups,
timeouts, output to the job log), a few repositories at a time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from orbital.agents.workspace import CommandResult, Workspace
from orbital.fleet import Fleet
from orbital.pipeline import PipelineConfig, framework_version_from
from orbital.settings import Settings
from orbital.sync.versions import (
    compare_versions,
    newest_release,
    parse_ls_remote_tags,
    version_key,
)

__all__ = [
    "AHEAD",
    "BEHIND",
    "STATUSES",
    "UNKNOWN",
    "UP_TO_DATE",
    "DriftReport",
    "DriftResult",
    "RepoRef",
    "Target",
    "check_drift",
    "classify",
    "fleet_refs",
    "resolve_target",
]

logger = logging.getLogger(__name__)

UP_TO_DATE = "up-to-date"
BEHIND = "behind"
AHEAD = "ahead"
UNKNOWN = "unknown"
STATUSES = (UP_TO_DATE, BEHIND, AHEAD, UNKNOWN)

_VERSION_DIR = ".devcontainer"


@dataclass(frozen=True)
class RepoRef:
    """A repository and branch to check; ``name`` is its registry name, if any."""

    repo: str
    branch: str = "main"
    name: str = ""


@dataclass(frozen=True)
class Target:
    """The version every repository should declare; ``version`` is "" when it could
    not be determined (``reason`` says why)."""

    version: str
    source: str
    reason: str = ""


@dataclass(frozen=True)
class DriftResult:
    """One repository's drift status."""

    repo: str
    branch: str
    status: str
    current: str = ""
    target: str = ""
    reason: str = ""
    name: str = ""
    commit_sha: str = ""
    checked_at: float = 0.0
    checked_by: str = ""

    @property
    def drifted(self) -> bool:
        return self.status in (BEHIND, AHEAD)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DriftReport:
    """A drift check's target and per-repository results."""

    target: Target
    results: tuple[DriftResult, ...]
    checked_at: float
    checked_by: str
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tally = Counter(r.status for r in self.results)
        self.counts.update({status: tally.get(status, 0) for status in STATUSES})

    def summary(self) -> str:
        """One line: the counts and the target."""
        counts = ", ".join(f"{self.counts[s]} {s}" for s in STATUSES)
        if not self.target.version:
            return f"{counts}; target unknown: {self.target.reason}"
        return f"{counts}; target {self.target.version} ({self.target.source})"


def fleet_refs(fleet: Fleet, only: list[str] | None = None) -> list[RepoRef]:
    """The registry's repositories to check, in file order: every entry that is not
    archived (an archived lab is frozen on purpose), or only those named in ``only``
    (``owner/name`` or registry names)."""
    wanted = {w.casefold() for w in only or []}
    refs = []
    for entry in fleet.entries:
        if wanted and entry.repo.casefold() not in wanted and entry.name.casefold() not in wanted:
            continue
        if not wanted and entry.status == "archived":
            continue
        refs.append(RepoRef(entry.repo, entry.branch, entry.name))
    return refs


async def resolve_target(settings: Settings, workspace: Workspace) -> Target:
    """Return the target version: the configured one, else the newest ``v*`` release
    tag of ``framework_repo``."""
    if settings.framework_target_version:
        configured = settings.framework_target_version
        if version_key(configured) is None:
            reason = f"framework_target_version {configured!r} is not a version number"
            return Target("", "configured", reason)
        return Target(configured, "configured")

    repo = settings.framework_repo
    url = PipelineConfig(git_url_template=settings.git_url_template).git_url(repo)
    await workspace.narrate(f"target: newest release tag of {repo}")
    argv = ["git", "ls-remote", "--tags", "--refs", "--", url, "refs/tags/v*"]
    result = await workspace.run(
        argv, timeout_s=settings.sync_git_timeout_s, echo=False, capture=True
    )
    if not result.ok:
        return Target(
            "",
            f"tags of {repo}",
            f"git ls-remote of {repo} failed: {_last_line(result, workspace)}",
        )
    tag = newest_release(parse_ls_remote_tags(result.output))
    if tag is None:
        return Target("", f"tags of {repo}", f"{repo} has no release tag like v1.2.3")
    return Target(tag, f"newest release tag of {repo}")


async def check_drift(
    settings: Settings,
    workspace: Workspace,
    refs: list[RepoRef],
    *,
    checked_by: str,
) -> DriftReport:
    """Resolve the target and check every repository in ``refs`` against it,
    ``sync_concurrency`` at a time. Never raises for one repository's problem: it
    becomes that repository's ``unknown`` status."""
    target = await resolve_target(settings, workspace)
    now = time.time()
    results: dict[int, DriftResult] = {}
    slots = anyio.Semaphore(settings.sync_concurrency)

    async def one(index: int, ref: RepoRef) -> None:
        async with slots:
            current, sha, reason = await _read_version(settings, workspace, ref, index)
        results[index] = classify(
            ref, current, target, reason, sha=sha, now=now, checked_by=checked_by
        )

    async with anyio.create_task_group() as tg:
        for index, ref in enumerate(refs):
            tg.start_soon(one, index, ref)
    report = DriftReport(target, tuple(results[i] for i in range(len(refs))), now, checked_by)
    logger.info("sync %s: checked %d repositories: %s", checked_by, len(refs), report.summary())
    return report


def classify(
    ref: RepoRef,
    current: str,
    target: Target,
    reason: str = "",
    *,
    sha: str = "",
    now: float = 0.0,
    checked_by: str = "",
) -> DriftResult:
    """Turn a repository's version (or the reason there is none) into a result."""

    def result(
        status: str, current: str = "", target_version: str = "", why: str = ""
    ) -> DriftResult:
        return DriftResult(
            ref.repo, ref.branch, status, current, target_version, why,
            name=ref.name, commit_sha=sha, checked_at=now, checked_by=checked_by,
        )  # fmt: skip

    if not current:
        return result(UNKNOWN, "", target.version, reason)
    if version_key(current) is None:
        return result(
            UNKNOWN,
            current,
            target.version,
            f"declared version {current!r} is not a release number",
        )
    if not target.version:
        return result(UNKNOWN, current, "", f"target unknown: {target.reason}")
    order = compare_versions(current, target.version)
    return result(
        UP_TO_DATE if order == 0 else BEHIND if order < 0 else AHEAD, current, target.version
    )


async def _read_version(
    settings: Settings, workspace: Workspace, ref: RepoRef, index: int
) -> tuple[str, str, str]:
    """Return (version, commit sha, reason) of one repository; version "" with the
    reason when it cannot be read."""
    url = PipelineConfig(git_url_template=settings.git_url_template).git_url(ref.repo)
    dest = workspace.checkouts / f"{index:03d}-{ref.repo.replace('/', '--')}"
    timeout_s = settings.sync_git_timeout_s
    await workspace.narrate(f"read {ref.repo} branch {ref.branch}")

    cloned = await workspace.clone(
        url, ref.branch, dest, timeout_s=timeout_s, shallow=True, checkout=False
    )
    if not cloned.ok:
        return "", "", f"cannot read branch {ref.branch}: {_last_line(cloned, workspace)}"
    sha_result = await _git(workspace, dest, timeout_s, "rev-parse", "HEAD")
    sha = sha_result.output.decode(errors="replace").strip() if sha_result.ok else ""

    listing = await _git(
        workspace, dest, timeout_s, "ls-tree", "--name-only", "HEAD", "--", _VERSION_DIR
    )
    if not listing.output.strip():
        return "", sha, f"branch {ref.branch} has no {_VERSION_DIR} directory"
    checkout = await _git(
        workspace, dest, timeout_s, "checkout", "--quiet", "HEAD", "--", _VERSION_DIR
    )
    if not checkout.ok:
        return "", sha, f"cannot check out {_VERSION_DIR}: {_last_line(checkout, workspace)}"

    version = await framework_version_from(workspace.sandbox, str(dest))
    if not version:
        return (
            "",
            sha,
            (
                "no framework version declared (FRAMEWORK_VERSION in .devcontainer/util/"
                "source_framework.sh or variables.sh, or the dt-enablement image tag in devcontainer.json)"
            ),
        )
    return version, sha, ""


async def _git(workspace: Workspace, dest: Path, timeout_s: float, *args: str) -> CommandResult:
    return await workspace.run(
        ["git", *args], cwd=dest, timeout_s=timeout_s, echo=False, capture=True
    )


def _last_line(result: CommandResult, workspace: Workspace) -> str:
    lines = [line for line in result.text(workspace.secrets, 2000).splitlines() if line.strip()]
    return lines[-1][:300] if lines else result.describe()
