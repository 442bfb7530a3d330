"""Reading GitHub event payloads: the facts routing looks at, and the subject a
job is about.

:func:`facts_of` is lenient (a missing or odd field just matches no condition).
:func:`subject_of` runs only for deliveries that matched a rule and is strict:
every identifier that reaches a job (repository, branch, commit) is validated,
and a bad one is refused with status 422 naming the payload field. Free text
(titles, bodies, label names) is passed on as data, cut to GitHub's own limits;
the agent runner delimits it and never hands it to a shell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orbital.errors import InvalidIdentifierError, WebhookRejectedError
from orbital.github.routing import Facts
from orbital.ids import validate_branch, validate_commit, validate_repo

__all__ = ["BuildTarget", "Subject", "facts_of", "subject_of"]

_MAX_TITLE = 1024
_MAX_BODY = 65536  # GitHub's own limit on issue and pull request bodies
_MAX_LABELS = 100
_ZERO_SHA = "0" * 40


@dataclass(frozen=True)
class BuildTarget:
    """Where lab builds for a delivery run: for a pull request its head (a fork's
    repository included), for a push or a check suite the commit itself."""

    repo: str
    branch: str
    commit: str


@dataclass(frozen=True)
class Subject:
    """What the jobs of one delivery are about.

    ``repo``/``branch``/``commit`` are where agent and sync jobs act (for a pull
    request from a fork: the base repository and branch, with the head in
    ``params``). ``registry_repo`` is looked up in the fleet for builds, and
    ``once_id`` names the subject in "once" keys (``issue-12``, ``pr-3``, ``sha-…``).
    ``build`` is None with ``no_build`` saying why when nothing can be built.
    """

    noun: str
    repo: str
    branch: str
    commit: str
    once_id: str
    registry_repo: str
    params: dict[str, Any] = field(default_factory=dict)
    build: BuildTarget | None = None
    no_build: str = ""


def facts_of(event: str, payload: dict[str, Any]) -> Facts:
    """Read what the routing conditions look at; never raises."""
    action = _loose(payload, "action")
    item = payload.get("issue") if event == "issues" else payload.get("pull_request")
    if action in ("labeled", "unlabeled"):
        labels = _label_names([payload.get("label")])
    elif isinstance(item, dict):
        labels = _label_names(item.get("labels"))
    else:
        labels = ()
    suite = payload.get("check_suite")
    repository = payload.get("repository")
    return Facts(
        event=event,
        action=action,
        labels=labels,
        conclusion=_loose(suite, "conclusion") if isinstance(suite, dict) else "",
        ref=_loose(payload, "ref") if event == "push" else "",
        default_branch=_loose(repository, "default_branch") if isinstance(repository, dict) else "",
    )


def subject_of(event: str, payload: dict[str, Any]) -> Subject | str:
    """Return the subject of a routed delivery, or a reason why it has none (a
    deleted branch, a suite without a branch).

    Raises:
        WebhookRejectedError: 422 naming the field, for a missing or invalid
            identifier or a field of the wrong type.
    """
    return _READERS[event](payload)


def _issue(payload: dict[str, Any]) -> Subject | str:
    repo = _ident(payload, "repository.full_name", validate_repo)
    number = _number(payload, "issue.number")
    return Subject(
        noun=f"issue {repo}#{number}",
        repo=repo,
        branch=_ident(payload, "repository.default_branch", validate_branch),
        commit="",
        once_id=f"issue-{number}",
        registry_repo=repo,
        params={
            "issue_number": number,
            "issue_title": _text(payload, "issue.title", _MAX_TITLE),
            "issue_body": _text(payload, "issue.body", _MAX_BODY),
            "issue_url": _text(payload, "issue.html_url", 500),
            "issue_author": _text(payload, "issue.user.login", 100),
            "labels": list(_label_names(_get(payload, "issue.labels", list, []))),
        },
    )


def _pull_request(payload: dict[str, Any]) -> Subject | str:
    base_repo = _ident(payload, "pull_request.base.repo.full_name", validate_repo)
    base_ref = _ident(payload, "pull_request.base.ref", validate_branch)
    number = _number(payload, "pull_request.number")
    head_ref = _ident(payload, "pull_request.head.ref", validate_branch)
    head_sha = _ident(payload, "pull_request.head.sha", validate_commit)
    head_repo_data = _get(payload, "pull_request.head.repo", dict, None)
    head_repo = (
        _ident(payload, "pull_request.head.repo.full_name", validate_repo)
        if head_repo_data is not None
        else ""
    )
    fork = head_repo.casefold() != base_repo.casefold()
    # A fork's branch does not exist in the base repository: agent jobs get the base
    # branch there and find the head through params (or refs/pull/N/head).
    return Subject(
        noun=f"pull request {base_repo}#{number}",
        repo=base_repo,
        branch=base_ref if fork else head_ref,
        commit="" if fork else head_sha,
        once_id=f"pr-{number}",
        registry_repo=base_repo,
        params={
            "pr_number": number,
            "pr_title": _text(payload, "pull_request.title", _MAX_TITLE),
            "pr_body": _text(payload, "pull_request.body", _MAX_BODY),
            "pr_url": _text(payload, "pull_request.html_url", 500),
            "pr_author": _text(payload, "pull_request.user.login", 100),
            "head_repo": head_repo,
            "head_ref": head_ref,
            "head_sha": head_sha,
            "base_ref": base_ref,
            "fork": fork,
            "labels": list(_label_names(_get(payload, "pull_request.labels", list, []))),
        },
        build=BuildTarget(head_repo, head_ref, head_sha) if head_repo else None,
        no_build="" if head_repo else "the pull request's head repository was deleted",
    )


def _check_suite(payload: dict[str, Any]) -> Subject | str:
    repo = _ident(payload, "repository.full_name", validate_repo)
    if _get(payload, "check_suite.head_branch", str, None) is None:
        return f"check suite in {repo} has no head branch (a fork's or a deleted branch)"
    branch = _ident(payload, "check_suite.head_branch", validate_branch)
    sha = _ident(payload, "check_suite.head_sha", validate_commit)
    numbers = [
        pr["number"]
        for pr in _get(payload, "check_suite.pull_requests", list, [])
        if isinstance(pr, dict) and type(pr.get("number")) is int and pr["number"] > 0
    ]
    return Subject(
        noun=f"check suite on {repo}@{sha[:12]}",
        repo=repo,
        branch=branch,
        commit=sha,
        once_id=f"sha-{sha}",
        registry_repo=repo,
        params={
            "pr_number": numbers[0] if numbers else None,
            "pr_numbers": numbers,
            "head_branch": branch,
            "head_sha": sha,
            "conclusion": _text(payload, "check_suite.conclusion", 40),
            "check_suite_id": _get(payload, "check_suite.id", int, None),
            "check_suite_url": _text(payload, "check_suite.url", 500),
            "app": _text(payload, "check_suite.app.slug", 100),
        },
        build=BuildTarget(repo, branch, sha),
    )


def _push(payload: dict[str, Any]) -> Subject | str:
    repo = _ident(payload, "repository.full_name", validate_repo)
    ref = _get(payload, "ref", str, "")
    if not ref.startswith("refs/heads/"):
        return f"push to {ref[:100]!r} in {repo} is not a branch"
    if payload.get("deleted") is True or payload.get("after") == _ZERO_SHA:
        return f"push to {ref[:100]!r} in {repo} deleted the branch"
    try:
        branch = validate_branch(ref.removeprefix("refs/heads/"))
    except InvalidIdentifierError as err:
        raise WebhookRejectedError(422, f"field ref: {err}") from None
    after = _ident(payload, "after", validate_commit)
    return Subject(
        noun=f"push to {repo}@{branch}",
        repo=repo,
        branch=branch,
        commit=after,
        once_id=f"sha-{after}",
        registry_repo=repo,
        params={
            "ref": ref,
            "before": _text(payload, "before", 40),
            "after": after,
            "forced": payload.get("forced") is True,
            "pusher": _text(payload, "pusher.name", 100),
            "compare_url": _text(payload, "compare", 500),
            "commit_count": len(_get(payload, "commits", list, [])),
        },
        build=BuildTarget(repo, branch, after),
    )


_READERS: dict[str, Callable[[dict[str, Any]], Subject | str]] = {
    "issues": _issue,
    "pull_request": _pull_request,
    "check_suite": _check_suite,
    "push": _push,
}


def _get(payload: dict[str, Any], path: str, kind: type, default: Any) -> Any:
    """The value at a dotted path; ``default`` when absent or null; 422 when it has
    another type than ``kind``."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, dict):
            return default
        value = value.get(part)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WebhookRejectedError(422, f"field {path}: expected {kind.__name__}")
    return value


def _ident(payload: dict[str, Any], path: str, validate: Callable[[str], str]) -> str:
    value = _get(payload, path, str, None)
    if value is None:
        raise WebhookRejectedError(422, f"field {path}: missing")
    try:
        return validate(value)
    except InvalidIdentifierError as err:
        raise WebhookRejectedError(422, f"field {path}: {str(err)[:200]}") from None


def _number(payload: dict[str, Any], path: str) -> int:
    value = _get(payload, path, int, None)
    if value is None or value <= 0:
        raise WebhookRejectedError(422, f"field {path}: expected a positive number")
    return int(value)


def _text(payload: dict[str, Any], path: str, limit: int) -> str:
    value = _get(payload, path, str, "")
    return str(value)[:limit]


def _loose(data: Any, key: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def _label_names(labels: Any) -> tuple[str, ...]:
    if not isinstance(labels, list):
        return ()
    names = (lab.get("name") for lab in labels[:_MAX_LABELS] if isinstance(lab, dict))
    return tuple(name[:100] for name in names if isinstance(name, str) and name)
