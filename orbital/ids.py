"""Identifiers: job ids Orbital makes, and validation of identifiers from outside.

Everything that arrives from a webhook, ``repos.yaml`` or a user is checked here
before it is stored or used in a command line. The rules follow GitHub's own
limits, narrowed where a value would be dangerous on a command line (a leading
``-`` would read as an option).
"""

from __future__ import annotations

import os
import re
import threading
import time

from orbital.errors import InvalidIdentifierError

__all__ = [
    "new_job_id",
    "validate_arch",
    "validate_branch",
    "validate_commit",
    "validate_job_id",
    "validate_repo",
]

ARCHES = ("arm64", "amd64")

_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
# Job ids are DNS labels (RFC 1123) so they can name containers, hosts and files.
_JOB_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_BRANCH_CHARS = re.compile(r"^[A-Za-z0-9._/+@=,-]+$")
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

_lock = threading.Lock()
_last_ms = 0
_seq = 0


def _refuse(kind: str, value: object, why: str) -> InvalidIdentifierError:
    return InvalidIdentifierError(f"invalid {kind} {value!r}: {why}")


def validate_repo(value: str) -> str:
    """Return ``value`` if it is a GitHub ``owner/name``; raise otherwise.

    Raises:
        InvalidIdentifierError: naming the value and the rule it breaks.
    """
    if not isinstance(value, str) or value.count("/") != 1:
        raise _refuse("repository", value, "expected owner/name")
    owner, name = value.split("/")
    if not _OWNER.fullmatch(owner):
        raise _refuse(
            "repository", value, "owner must be 1-39 letters, digits or single inner hyphens"
        )
    if not _NAME.fullmatch(name) or name in {".", ".."} or name.endswith(".git"):
        raise _refuse("repository", value, "name must be 1-100 letters, digits, '.', '_' or '-'")
    return value


def validate_branch(value: str) -> str:
    """Return ``value`` if it is a safe git branch name (git check-ref-format rules,
    plus no leading ``-``); raise otherwise.

    Raises:
        InvalidIdentifierError: naming the value and the rule it breaks.
    """
    if not isinstance(value, str) or not value:
        raise _refuse("branch", value, "must be a non-empty string")
    if len(value) > 255:
        raise _refuse("branch", value[:40] + "...", "longer than 255 characters")
    if not _BRANCH_CHARS.fullmatch(value):
        raise _refuse("branch", value, "only letters, digits and . _ / + @ = , - are allowed")
    if value.startswith(("-", "/")) or value.endswith(("/", ".", ".lock")):
        raise _refuse(
            "branch", value, "must not start with '-' or '/' or end with '/', '.' or '.lock'"
        )
    if ".." in value or "//" in value or "@{" in value or value == "@":
        raise _refuse("branch", value, "must not contain '..', '//' or '@{'")
    if any(part.startswith(".") for part in value.split("/")):
        raise _refuse("branch", value, "no path component may start with '.'")
    return value


def validate_commit(value: str) -> str:
    """Return ``value`` if it is a lowercase hex commit sha (7-40 digits); raise otherwise.

    Raises:
        InvalidIdentifierError: naming the value and the rule it breaks.
    """
    if not isinstance(value, str) or not _COMMIT.fullmatch(value):
        raise _refuse("commit", value, "expected 7 to 40 lowercase hex digits")
    return value


def validate_arch(value: str) -> str:
    """Return ``value`` if it is one of the supported architectures; raise otherwise."""
    if value not in ARCHES:
        raise _refuse("arch", value, f"expected one of {', '.join(ARCHES)}")
    return value


def validate_job_id(value: str) -> str:
    """Return ``value`` if it can serve as a job id (a DNS label); raise otherwise."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise _refuse("job id", value, "expected 1-63 lowercase letters, digits or inner hyphens")
    return value


def _base32(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


def new_job_id(prefix: str = "j") -> str:
    """Return a new job id: unique across processes and sortable by creation time.

    The id is ``<prefix>`` followed by 10 base32 digits of milliseconds since the
    epoch, a per-process sequence number and 10 random digits, all lowercase, so
    it is also a valid DNS label and container name.
    """
    global _last_ms, _seq
    with _lock:
        now_ms = int(time.time() * 1000)
        if now_ms <= _last_ms:
            _seq += 1
            now_ms = _last_ms
        else:
            _seq = 0
        _last_ms = now_ms
        seq = _seq
    random_part = int.from_bytes(os.urandom(7), "big")
    return f"{prefix}{_base32(now_ms, 10)}{_base32(seq, 3)}{_base32(random_part, 10)}"
