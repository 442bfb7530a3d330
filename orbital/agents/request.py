"""What an agent job is asked to do, read from its ``params``.

The webhook router (and operators) enqueue agent jobs with ``params`` like::

    {"action": "fix-issue",
     "issue": {"number": 7, "title": "...", "body": "...", "url": "..."}}
    {"action": "review-pr", "head_sha": "...",
     "pull_request": {"number": 42, "title": "...", "body": "...", "url": "..."}}
    {"action": "fix-ci", "pull_request": {"number": 42}, "head_sha": "...", "arch": "amd64"}
    {"action": "diagnose", "arch": "arm64", "build_job_id": "j..."}
    {"action": "diagnose", "runbook": "diagnose.ipynb", "parameters": {"depth": 2}}

Everything except the action is optional. The webhook router's flat keys
(``issue_number``, ``issue_title``, ``issue_body``, ``issue_url``; ``pr_number``,
``pr_title``, ``pr_body``, ``pr_url``, ``head_sha``, ``fork``) are read too: for a
pull request from a fork the job names the base repository and branch, and the
head is fetched from ``refs/pull/<number>/head``. Titles, bodies and failure
text are untrusted: they are only ever placed, delimited, inside the prompt
(:mod:`orbital.agents.prompt`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orbital.errors import JobParamsError
from orbital.ids import validate_arch, validate_commit, validate_job_id
from orbital.jobs import Job

__all__ = ["ACTIONS", "THRESHOLD_ACTIONS", "AgentRequest", "Thread", "runbook_for"]

#: The agent actions Orbital knows, each with its task text in the prompt.
ACTIONS = ("fix-issue", "review-pr", "fix-ci", "migrate", "scaffold", "diagnose")
#: Actions that act only after repeated failures of the same triple.
THRESHOLD_ACTIONS = ("fix-ci", "diagnose")

_RUNBOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ipynb$")
_TEXT_LIMIT = 60_000


@dataclass(frozen=True)
class Thread:
    """A GitHub issue or pull request the job is about."""

    kind: str  # "issue" or "pull request"
    number: int = 0
    title: str = ""
    body: str = ""
    url: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} #{self.number}" if self.number else self.kind


@dataclass(frozen=True)
class AgentRequest:
    """An agent job's instructions, validated."""

    action: str
    repo: str
    branch: str
    commit: str = ""
    arch: str = ""
    issue: Thread | None = None
    pull_request: Thread | None = None
    failed_step: str = ""
    failure_summary: str = ""
    build_job_id: str = ""
    fetch_ref: str = ""
    runbook: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_failures(self) -> bool:
        """Whether the consecutive-failure threshold applies."""
        return self.action in THRESHOLD_ACTIONS

    @property
    def threads(self) -> list[Thread]:
        return [t for t in (self.issue, self.pull_request) if t is not None]

    @classmethod
    def from_job(cls, job: Job, runbooks: Mapping[str, str] | None = None) -> AgentRequest:
        """Read and check an agent job's params.

        Args:
            job: the agent job (its repo and branch were validated at enqueue).
            runbooks: action -> runbook for actions configured to run one.

        Raises:
            JobParamsError: naming the param and the value that cannot be used.
            InvalidIdentifierError: for a malformed arch, commit or build job id.
        """
        params = job.params
        action = _text(params, "action", 40)
        known = (*ACTIONS, *(runbooks or {}))
        if action not in known:
            raise JobParamsError(
                f"job {job.id}: params.action {action!r} is not an agent action; "
                f"expected one of {', '.join(known)}"
            )
        if not job.repo:
            raise JobParamsError(f"job {job.id}: agent jobs need a repository (owner/name)")
        arch = _text(params, "arch", 20) or job.arch
        commit = _text(params, "head_sha", 40) or job.commit
        build_job_id = _text(params, "build_job_id", 63)
        runbook = _text(params, "runbook", 200) or (runbooks or {}).get(action, "")
        pull_request = _thread(params, "pull_request", "pull request")
        fork = params.get("fork") is True and pull_request is not None and pull_request.number
        fetch_ref = f"refs/pull/{pull_request.number}/head" if fork and pull_request else ""
        parameters = params.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise JobParamsError(
                f"job {job.id}: params.parameters must be a mapping, "
                f"got {type(parameters).__name__}"
            )
        return cls(
            action=action,
            repo=job.repo,
            branch=job.branch,
            commit=validate_commit(commit) if commit else "",
            arch=validate_arch(arch) if arch else "",
            issue=_thread(params, "issue", "issue"),
            pull_request=pull_request,
            failed_step=_text(params, "failed_step", 500),
            failure_summary=_text(params, "failure_summary", _TEXT_LIMIT),
            build_job_id=validate_job_id(build_job_id) if build_job_id else "",
            fetch_ref=fetch_ref,
            runbook=_runbook_name(job.id, runbook) if runbook else "",
            parameters=dict(parameters),
        )


def runbook_for(entries: tuple[str, ...]) -> dict[str, str]:
    """Parse the ``agent_runbooks`` setting (``action=notebook.ipynb`` items).

    Raises:
        JobParamsError: for an item without ``=`` or with a bad notebook name.
    """
    mapping: dict[str, str] = {}
    for item in entries:
        action, sep, name = item.partition("=")
        if not sep or not action.strip():
            raise JobParamsError(
                f"setting agent_runbooks item {item!r}: expected action=notebook.ipynb"
            )
        mapping[action.strip()] = _runbook_name("agent_runbooks", name.strip())
    return mapping


def _runbook_name(where: str, name: str) -> str:
    if not _RUNBOOK_NAME.fullmatch(name):
        raise JobParamsError(
            f"{where}: runbook {name!r} is not a notebook file name in runbooks/ "
            "(letters, digits, '.', '_' or '-', ending in .ipynb, no directories)"
        )
    return name


def _text(params: Mapping[str, Any], key: str, limit: int) -> str:
    value = params.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise JobParamsError(f"params.{key} must be text, got {type(value).__name__}")
    return str(value)[:limit]


def _number(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return number if 0 < number < 10**9 else 0


def _thread(params: Mapping[str, Any], key: str, kind: str) -> Thread | None:
    raw = params.get(key)
    if isinstance(raw, Mapping):
        return Thread(
            kind=kind,
            number=_number(raw.get("number")),
            title=_text(raw, "title", 1000),
            body=_text(raw, "body", _TEXT_LIMIT),
            url=_text(raw, "url", 500) or _text(raw, "html_url", 500),
        )
    # The webhook router's flat keys: issue_number, issue_title... / pr_number, pr_title...
    flat = "issue" if key == "issue" else "pr"
    number = _number(params.get(f"{flat}_number", raw))
    if not number:
        return None
    return Thread(
        kind=kind,
        number=number,
        title=_text(params, f"{flat}_title", 1000),
        body=_text(params, f"{flat}_body", _TEXT_LIMIT),
        url=_text(params, f"{flat}_url", 500),
    )
