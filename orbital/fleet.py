"""The fleet registry: ``repos.yaml`` loaded, validated and queried.

The registry is a top-level ``repos:`` list with one mapping per lab repository.
Orbital reads ``name``, ``repo``, ``status``, ``arch``, ``ci``, ``branch``,
``tags`` and ``duration``; every other key (title, maintainer, description, ...)
is kept unchanged in :attr:`RepoEntry.extra`, so :meth:`RepoEntry.to_dict`
gives the entry back as it was written. Validation looks at the whole file and
reports every problem in one :class:`~orbital.errors.FleetError`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from orbital.errors import FleetError
from orbital.ids import ARCHES, validate_branch, validate_repo

__all__ = [
    "MAX_FLEET_BYTES",
    "STATUSES",
    "Fleet",
    "RepoEntry",
    "load_fleet",
    "parse_duration",
    "parse_fleet",
]

logger = logging.getLogger(__name__)

#: Allowed ``status`` values. The real registry uses active and archived; the rest
#: are the usual lifecycle words. Only ``active`` entries run nightly.
STATUSES = ("active", "archived", "deprecated", "paused", "wip")
#: The real registry is about 15 kB; a file this large is a mistake, not a fleet.
MAX_FLEET_BYTES = 4 * 1024 * 1024
# YAML aliases let a few lines describe an enormous (or endless) structure that
# any consumer walking the entries would then expand; refuse documents whose
# expanded form has more values than this.
_MAX_VALUES = 200_000
_MAX_PROBLEMS_SHOWN = 50
_REQUIRED = ("name", "repo", "status")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DURATION = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?) ?(s|sec|m|min|h|hr)$")
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 4, 4


def _show(value: object) -> str:
    """A short repr that stays short for huge strings and alias-built structures."""
    return _repr.repr(value)


@dataclass(frozen=True)
class RepoEntry:
    """One lab repository of the fleet, validated.

    ``arches`` is in :data:`orbital.ids.ARCHES` order; ``extra`` holds every key
    Orbital does not interpret, as loaded; ``duration_text`` is ``duration`` as
    written (``duration_s`` is the same in seconds).
    """

    name: str
    repo: str
    status: str
    arches: tuple[str, ...] = ARCHES
    ci: bool = True
    branch: str = "main"
    tags: tuple[str, ...] = ()
    duration_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    duration_text: str | None = None

    @property
    def nightly_eligible(self) -> bool:
        """Whether the nightly runs this repository: status active and ``ci`` not false."""
        return self.status == "active" and self.ci

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as a ``repos.yaml`` mapping, extra keys included.

        Defaults are left out as the registry leaves them out (no ``arch`` when the
        entry runs on every arch, no ``ci`` when true, no ``branch`` when main), so
        loading the result gives an equal entry. The result is a fresh copy.
        """
        out: dict[str, Any] = {"name": self.name, "repo": self.repo, "status": self.status}
        if self.arches != ARCHES:
            out["arch"] = self.arches[0] if len(self.arches) == 1 else list(self.arches)
        if not self.ci:
            out["ci"] = False
        if self.branch != "main":
            out["branch"] = self.branch
        if self.tags:
            out["tags"] = list(self.tags)
        if self.duration_s is not None:
            out["duration"] = (
                self.duration_text or f"{self.duration_s:f}".rstrip("0").rstrip(".") + "s"
            )
        out.update(copy.deepcopy(dict(self.extra)))
        return out


@dataclass(frozen=True)
class Fleet:
    """The whole registry: where it came from and its entries in file order."""

    path: str
    entries: tuple[RepoEntry, ...]

    def eligible(self) -> list[RepoEntry]:
        """Return the entries the nightly runs, in file order."""
        return [entry for entry in self.entries if entry.nightly_eligible]

    def nightly_fanout(self) -> list[tuple[RepoEntry, str]]:
        """Return one ``(entry, arch)`` pair per nightly job: file order, then arch order."""
        return [(entry, arch) for entry in self.eligible() for arch in entry.arches]

    def by_repo(self, repo: str) -> RepoEntry | None:
        """Return the entry for GitHub ``owner/name`` (any letter case), or None."""
        wanted = repo.casefold()
        return next((e for e in self.entries if e.repo.casefold() == wanted), None)

    def by_name(self, name: str) -> RepoEntry | None:
        """Return the entry whose ``name`` is exactly ``name``, or None."""
        return next((entry for entry in self.entries if entry.name == name), None)


def parse_duration(text: str) -> float:
    """Return a duration such as ``90s``, ``20m``, ``30min``, ``2h`` or ``1.5h`` in seconds.

    Raises:
        ValueError: naming the value, when it is not a positive number and a unit.
    """
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid duration {_show(text)}: expected a number and a unit s, m, min or h,"
            " like 90s, 20m, 30min or 1.5h"
        )
    seconds = float(match[1]) * _UNIT_S[match[2]]
    if seconds <= 0:
        raise ValueError(f"invalid duration {_show(text)}: must be longer than zero")
    return seconds


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"invalid name {_show(value)}: expected 1-100 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return value


def _status(value: Any) -> str:
    if not isinstance(value, str) or value not in STATUSES:
        raise ValueError(f"unknown status {_show(value)}: expected one of {', '.join(STATUSES)}")
    return value


def _arches(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an arch or a non-empty list of arches, got {_show(value)}")
    for item in items:
        if not isinstance(item, str) or item not in ARCHES:
            raise ValueError(f"unknown arch {_show(item)}: expected one of {', '.join(ARCHES)}")
    return tuple(arch for arch in ARCHES if arch in items)


def _ci(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"expected a list of non-empty strings, got {_show(value)}")
    return tuple(value)


def _duration(value: Any) -> str:
    parse_duration(value)
    return str(value)


# How each interpreted key is checked; InvalidIdentifierError is a ValueError too.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "repo": validate_repo,
    "status": _status,
    "arch": _arches,
    "ci": _ci,
    "branch": validate_branch,
    "tags": _tags,
    "duration": _duration,
}


class _Checker:
    """Builds entries one by one, collecting every problem instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.names: dict[str, int] = {}
        self.repos: dict[str, int] = {}

    def entry(self, index: int, raw: object) -> RepoEntry | None:
        where = f"repos[{index}]"
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: expected a mapping of keys to values, got {_show(raw)}")
            return None
        if isinstance(raw.get("name"), str):
            where += f" (name {_show(raw['name'])})"
        before = len(self.problems)
        for key in raw:
            if not isinstance(key, str):
                self.problems.append(f"{where}, key {_show(key)}: keys must be strings")

        values: dict[str, Any] = {}
        for key, check in _CHECKS.items():
            if key not in raw:
                if key in _REQUIRED:
                    self.problems.append(f"{where}, field {key!r}: missing required key")
                continue
            try:
                values[key] = check(raw[key])
            except ValueError as err:
                self.problems.append(f"{where}, field {key!r}: {str(err)[:300]}")

        self._unique(where, index, "name", values.get("name"), self.names)
        self._unique(where, index, "repo", values.get("repo"), self.repos)
        if len(self.problems) > before:
            return None
        text = values.get("duration")
        return RepoEntry(
            name=values["name"],
            repo=values["repo"],
            status=values["status"],
            arches=values.get("arch", ARCHES),
            ci=values.get("ci", True),
            branch=values.get("branch", "main"),
            tags=values.get("tags", ()),
            duration_s=None if text is None else parse_duration(text),
            extra=MappingProxyType({k: v for k, v in raw.items() if k not in _CHECKS}),
            duration_text=text,
        )

    def _unique(
        self, where: str, index: int, key: str, value: str | None, seen: dict[str, int]
    ) -> None:
        if value is None:
            return
        first = seen.setdefault(value.casefold(), index)
        if first != index:
            self.problems.append(
                f"{where}, field {key!r}: duplicate {key} {value!r}, already used by repos[{first}]"
            )


def _too_big(data: object) -> bool:
    """Whether ``data``, with every alias expanded, holds more than _MAX_VALUES values."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (``safe_load``
    silently keeps the last one, so ``repo:`` twice would go unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice", key_node.start_mark,
                )  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_fleet(text: str, source: str = "<string>") -> Fleet:
    """Parse and validate a fleet registry given as YAML text.

    ``source`` names the text in error messages and becomes :attr:`Fleet.path`.

    Raises:
        FleetError: naming ``source``, then every problem found (entry index and name,
            field, value), or the line of a YAML syntax error.
    """
    if len(text) > MAX_FLEET_BYTES:
        raise FleetError(f"{source}: {len(text)} characters, over the {MAX_FLEET_BYTES} limit")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FleetError(f"{source}: invalid YAML{at}: {err.problem or err.context}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise FleetError(
            f"{source}: invalid YAML: {str(err)[:300] or 'nested too deeply'}"
        ) from None
    if _too_big(data):
        raise FleetError(f"{source}: YAML aliases expand to more than {_MAX_VALUES} values")

    repos = data.get("repos") if isinstance(data, dict) else None
    if not isinstance(repos, list) or not repos:
        got = _show(repos)
        raise FleetError(f"{source}: field 'repos': expected a non-empty top-level list, got {got}")
    checker = _Checker()
    entries = [checker.entry(index, raw) for index, raw in enumerate(repos)]
    if checker.problems:
        shown = checker.problems[:_MAX_PROBLEMS_SHOWN]
        more = len(checker.problems) - len(shown)
        lines = "".join(f"\n  - {problem}" for problem in shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise FleetError(
            f"{source}: {len(checker.problems)} problem(s) in the fleet registry:{lines}{tail}"
        )
    return Fleet(path=source, entries=tuple(e for e in entries if e is not None))


def load_fleet(path: str | os.PathLike[str]) -> Fleet:
    """Read, parse and validate the fleet registry file at ``path``.

    Raises:
        FleetError: naming the file, when it cannot be read, is larger than
            :data:`MAX_FLEET_BYTES`, is not UTF-8, or fails :func:`parse_fleet`.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read(MAX_FLEET_BYTES + 1)
    except OSError as err:
        raise FleetError(f"{name}: cannot read the fleet registry: {err.strerror or err}") from err
    if len(data) > MAX_FLEET_BYTES:
        raise FleetError(
            f"{name}: larger than the {MAX_FLEET_BYTES}-byte limit for a fleet registry"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FleetError(f"{name}: not UTF-8 text (bad byte at offset {err.start})") from None

    fleet = parse_fleet(text, source=name)
    logger.info(
        "fleet registry %s loaded: %d entries, %d run nightly as %d jobs",
        name,
        len(fleet.entries),
        len(fleet.eligible()),
        len(fleet.nightly_fanout()),
    )
    return fleet
