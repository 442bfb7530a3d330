"""Framework version numbers: parsing, ordering, and the newest release tag.

Labs declare versions like ``1.2.0`` (``FRAMEWORK_VERSION=``) or ``v1.2`` (the
``dt-enablement`` image tag); release tags of the framework repository are
``v<major>.<minor>[.<patch>...]``. A leading ``v`` is ignored and missing parts
count as zero, so ``v1.2`` equals ``1.2.0``. A pre-release (``1.3.0-rc1``) sorts
before its release. Anything else (``latest``, a branch name) is not a version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "compare_versions",
    "is_release_tag",
    "newest_release",
    "parse_ls_remote_tags",
    "version_key",
]

_VERSION = re.compile(r"^v?(\d{1,9}(?:\.\d{1,9}){0,3})(?:-([0-9A-Za-z.-]{1,40}))?$")
_RELEASE_TAG = re.compile(r"^v\d{1,9}(?:\.\d{1,9}){0,3}$")
_PARTS = 4

VersionKey = tuple[tuple[int, ...], int, str]


def version_key(text: str) -> VersionKey | None:
    """Return a sort key for a version string, or None if it is not one."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    numbers = [int(part) for part in match.group(1).split(".")]
    numbers += [0] * (_PARTS - len(numbers))
    pre = match.group(2) or ""
    # A release (1) sorts after any of its pre-releases (0).
    return tuple(numbers), 0 if pre else 1, pre


def compare_versions(current: str, target: str) -> int:
    """Return -1, 0 or 1 as ``current`` is older than, equal to or newer than ``target``.

    Raises:
        ValueError: naming the value that is not a version number.
    """
    a, b = _checked_key(current), _checked_key(target)
    return (a > b) - (a < b)


def _checked_key(text: str) -> VersionKey:
    key = version_key(text)
    if key is None:
        raise ValueError(f"{text!r} is not a version number (expected e.g. 1.2.0 or v1.2)")
    return key


def is_release_tag(tag: str) -> bool:
    """Whether ``tag`` names a framework release (``v1.2.3``; no pre-releases)."""
    return bool(_RELEASE_TAG.fullmatch(tag))


def newest_release(tags: Iterable[str]) -> str | None:
    """Return the newest release tag among ``tags`` (others ignored), or None."""
    releases = [t for t in tags if is_release_tag(t)]
    if not releases:
        return None
    return max(releases, key=lambda t: version_key(t) or ((), 0, ""))


def parse_ls_remote_tags(output: bytes) -> list[str]:
    """Return the tag names in ``git ls-remote --tags --refs`` output."""
    names = []
    for line in output.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].startswith("refs/tags/"):
            names.append(parts[1].removeprefix("refs/tags/"))
    return names
