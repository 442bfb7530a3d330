"""The routing table: which GitHub events start which jobs.

A table is a list of rules. A rule names an event and optional conditions on the
delivery's facts (its ``action``, the labels involved, a check suite's conclusion,
whether a push went to the default branch) and the job specs to start when it
matches. Every matching rule contributes its jobs. The built-in table is
:data:`DEFAULT_TABLE`; ``webhook_routing_file`` names a YAML or JSON file that
replaces it, written like this::

    rules:
      - event: issues
        actions: [opened, labeled]
        labels: [bug]              # any of these (case-insensitive)
        jobs:
          - agent: fix-issue       # an agent job with params.action = fix-issue
            once: true             # at most one per issue, whatever later arrives
      - event: pull_request
        actions: [opened, reopened, synchronize]
        jobs:
          - builds: integration-test   # one lab job per arch the registry gives
      - event: check_suite
        actions: [completed]
        conclusions: [failure]
        jobs:
          - agent: fix-ci
      - event: push
        default_branch: true       # only pushes to the repository's default branch
        jobs:
          - sync: validate

Labels are matched against the label just added for ``labeled``/``unlabeled``
actions, and against the issue's or pull request's labels otherwise, so adding an
unrelated label to a bug issue does not match a ``bug`` rule again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from orbital.errors import ConfigError

__all__ = [
    "BUILD_EVENTS",
    "BUILD_TYPES",
    "DEFAULT_TABLE",
    "ROUTABLE_EVENTS",
    "Facts",
    "JobSpec",
    "RoutingTable",
    "Rule",
    "load_routing_table",
    "parse_routing_table",
]

#: Events a rule may name: each has a payload reader in :mod:`orbital.github.payloads`.
ROUTABLE_EVENTS = ("issues", "pull_request", "check_suite", "push")
#: Events whose payload names a commit to build (a PR's head, a suite's or push's sha).
BUILD_EVENTS = ("pull_request", "check_suite", "push")
BUILD_TYPES = ("integration-test", "unit-test")
JOB_KINDS = ("agent", "builds", "sync")
_ACTION = re.compile(r"[a-z][a-z0-9-]{0,39}")
_MAX_TABLE_BYTES = 256 * 1024
_RULE_KEYS = {"event", "actions", "labels", "conclusions", "default_branch", "jobs"}


@dataclass(frozen=True)
class Facts:
    """What a rule's conditions look at, read from one delivery.

    ``labels`` is the label just added or removed for ``labeled``/``unlabeled``,
    otherwise every label of the issue or pull request.
    """

    event: str
    action: str = ""
    labels: tuple[str, ...] = ()
    conclusion: str = ""
    ref: str = ""
    default_branch: str = ""

    @property
    def to_default_branch(self) -> bool:
        return bool(self.default_branch) and self.ref == f"refs/heads/{self.default_branch}"

    def describe(self) -> str:
        """A short account of the facts for an "ignored" reason."""
        name = f"{self.event}.{self.action}" if self.action else self.event
        parts = []
        if self.event in ("issues", "pull_request"):
            parts.append("labels " + (", ".join(map(_printable, self.labels[:10])) or "none"))
        if self.conclusion:
            parts.append(f"conclusion {_printable(self.conclusion)}")
        if self.event == "push":
            ref, default = _printable(self.ref) or "none", _printable(self.default_branch) or "?"
            parts.append(f"ref {ref}, default branch {default}")
        return name + (f" ({'; '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class JobSpec:
    """One job a rule starts: ``kind`` is agent, builds or sync; ``action`` is the
    agent or sync action, or the lab job type for builds; ``once`` (agents only)
    allows one such job per subject (issue, pull request, commit) ever."""

    kind: str
    action: str
    once: bool = False

    def describe(self) -> str:
        return f"{self.kind} {self.action}" + (" (once)" if self.once else "")


@dataclass(frozen=True)
class Rule:
    """One row of the table; empty condition tuples match anything."""

    event: str
    jobs: tuple[JobSpec, ...]
    actions: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    conclusions: tuple[str, ...] = ()
    default_branch: bool = False

    def matches(self, facts: Facts) -> bool:
        """Whether every condition of the rule holds for ``facts``."""
        if facts.event != self.event:
            return False
        if self.actions and facts.action not in self.actions:
            return False
        if self.labels:
            wanted = {label.casefold() for label in self.labels}
            if not any(label.casefold() in wanted for label in facts.labels):
                return False
        if self.conclusions and facts.conclusion not in self.conclusions:
            return False
        return not (self.default_branch and not facts.to_default_branch)


@dataclass(frozen=True)
class RoutingTable:
    """The rules in order, and where they came from (a path or ``built-in``)."""

    rules: tuple[Rule, ...]
    source: str = "built-in"

    def jobs_for(self, facts: Facts) -> list[JobSpec]:
        """The job specs of every matching rule, in table order, each spec once."""
        specs: list[JobSpec] = []
        for rule in self.rules:
            if rule.matches(facts):
                specs.extend(s for s in rule.jobs if s not in specs)
        return specs


DEFAULT_TABLE = RoutingTable(
    rules=(
        Rule("issues", (JobSpec("agent", "fix-issue", once=True),),
             actions=("opened", "labeled"), labels=("bug",)),
        Rule("issues", (JobSpec("agent", "migrate", once=True),),
             actions=("opened", "labeled"), labels=("gen3-migration",)),
        Rule("issues", (JobSpec("agent", "scaffold", once=True),),
             actions=("opened", "labeled"), labels=("new-enablement",)),
        Rule("pull_request", (JobSpec("agent", "review-pr", once=True),), actions=("opened",)),
        Rule("pull_request", (JobSpec("builds", "integration-test"),),
             actions=("opened", "reopened", "synchronize")),
        # One fix-ci per failed head commit: a re-run that fails again on the same
        # commit has nothing new for the agent.
        Rule("check_suite", (JobSpec("agent", "fix-ci", once=True),),
             actions=("completed",), conclusions=("failure",)),
        Rule("push", (JobSpec("sync", "validate"),), default_branch=True),
    ),
)  # fmt: skip


def load_routing_table(path: str | os.PathLike[str]) -> RoutingTable:
    """Read a routing table from a YAML or JSON file (JSON is YAML too).

    Raises:
        ConfigError: naming the file, the rule and the key that is wrong.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            raw = handle.read(_MAX_TABLE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"webhook routing table {name}: cannot read it: {err}") from None
    if len(raw) > _MAX_TABLE_BYTES:
        raise ConfigError(f"webhook routing table {name}: over {_MAX_TABLE_BYTES} bytes")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"webhook routing table {name}: not valid YAML/JSON: {err}") from None
    return parse_routing_table(data, source=name)


def parse_routing_table(data: Any, source: str = "<data>") -> RoutingTable:
    """Build a table from decoded YAML/JSON (a mapping with a ``rules`` list).

    Raises:
        ConfigError: naming ``source``, the rule index and the offending key or value.
    """
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        raise ConfigError(f"webhook routing table {source}: expected a top-level 'rules' list")
    return RoutingTable(
        rules=tuple(_rule(raw, f"webhook routing table {source}, rules[{i}]")
                    for i, raw in enumerate(rules)),
        source=source,
    )  # fmt: skip


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r:.60}")
    unknown = sorted(str(k) for k in raw if k not in _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    event = raw.get("event")
    if event not in ROUTABLE_EVENTS:
        raise ConfigError(
            f"{where}, event: {event!r:.60} is not one of {', '.join(ROUTABLE_EVENTS)}"
        )
    jobs = raw.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError(f"{where}, jobs: expected a non-empty list of job specs")
    default_branch = raw.get("default_branch", False)
    if not isinstance(default_branch, bool):
        raise ConfigError(f"{where}, default_branch: expected true or false")

    return Rule(
        event=event,
        jobs=tuple(_spec(s, f"{where}, jobs[{j}]", event) for j, s in enumerate(jobs)),
        actions=_strings(raw.get("actions"), f"{where}, actions"),
        labels=_strings(raw.get("labels"), f"{where}, labels"),
        conclusions=_strings(raw.get("conclusions"), f"{where}, conclusions"),
        default_branch=default_branch,
    )


def _spec(raw: Any, where: str, event: str) -> JobSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{agent: fix-issue}}")
    kinds = [k for k in JOB_KINDS if k in raw]
    unknown = sorted(str(k) for k in raw if k not in (*JOB_KINDS, "once"))
    if len(kinds) != 1 or unknown:
        raise ConfigError(
            f"{where}: expected exactly one of {', '.join(JOB_KINDS)} and optionally 'once'"
        )
    kind = kinds[0]
    action = raw[kind]
    once = raw.get("once", False)
    if not isinstance(action, str) or not _ACTION.fullmatch(action):
        raise ConfigError(f"{where}, {kind}: {action!r:.60} is not a lower-case action name")
    if kind == "builds" and action not in BUILD_TYPES:
        raise ConfigError(f"{where}, builds: expected one of {', '.join(BUILD_TYPES)}")
    if kind == "builds" and event not in BUILD_EVENTS:
        raise ConfigError(f"{where}: a {event} event names no commit to build")
    if not isinstance(once, bool) or (once and kind != "agent"):
        raise ConfigError(f"{where}, once: expected true or false, and only on agent jobs")
    return JobSpec(kind, action, once)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items: Iterable[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{where}: expected a string or a list of non-empty strings")
    return tuple(items)


def _printable(text: str, limit: int = 60) -> str:
    """Payload text fit for a log line: cut, with control characters replaced."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
