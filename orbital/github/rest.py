"""A small GitHub REST client: enough for agents to comment on issues and pull
requests, built on the standard library (urllib) so worker nodes need nothing more.

The base URL is configurable (``github_api_url``: GitHub Enterprise, or a local
server in tests) and the token comes from ``github_token``. The token is sent as
an unredirected header, so a redirect to another host never carries it, and it
appears in no log line or exception.

Retries: a request refused by rate limiting (429, or 403 with a Retry-After or an
exhausted ``x-ratelimit-remaining``) is sent again after the wait GitHub asks for,
if that wait is short; a connection that could not be opened is retried with
backoff. A POST that may have reached GitHub (a timeout, a 5xx) is not sent again,
since a comment would then be posted twice; other methods retry 5xx answers too.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

from orbital import __version__
from orbital.errors import ConfigError, GitHubApiError
from orbital.ids import validate_repo
from orbital.settings import Settings

__all__ = ["MAX_COMMENT_CHARS", "Comment", "GitHubClient"]

logger = logging.getLogger(__name__)

#: GitHub refuses comment bodies longer than this many characters.
MAX_COMMENT_CHARS = 65536
_TRUNCATED = "\n\n… (truncated by Orbital)"
_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
_API_VERSION = "2022-11-28"


@dataclass(frozen=True)
class Comment:
    """A comment GitHub stored: its id and where a person can read it."""

    id: int
    url: str


class GitHubClient:
    """Blocking calls to the GitHub REST API.

    Args:
        base_url: the API root, such as ``https://api.github.com``.
        token: a token with permission to write issues and pull requests; empty
            for anonymous calls (comments need one).
        timeout_s: socket timeout of one request.
        max_attempts: attempts per call when a retry is allowed (see module doc).
        max_wait_s: the longest rate-limit wait honoured; a longer one fails at once.
        sleep: how to wait (tests pass a fake clock's).

    Raises:
        ConfigError: when ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        base_url: str = "https://api.github.com",
        token: str = "",
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
        max_wait_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ConfigError(
                f"github_api_url {base_url!r}: expected an http(s) URL such as "
                "https://api.github.com or https://HOST/api/v3"
            )
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._opener = urllib.request.build_opener()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> GitHubClient:
        """A client for ``settings.github_api_url`` with ``settings.github_token``."""
        return cls(settings.github_api_url, settings.github_token, **kwargs)

    def __repr__(self) -> str:
        return f"GitHubClient({self.base_url!r}, token={'set' if self._token else 'none'})"

    def post_comment(self, repo: str, number: int, body: str) -> Comment:
        """Comment on issue or pull request ``number`` of ``repo`` (``owner/name``).

        A body longer than GitHub accepts is cut, with a note saying so.

        Raises:
            ConfigError: when no token is configured.
            InvalidIdentifierError: when ``repo`` is not a valid ``owner/name``.
            ValueError: when ``number`` is not a positive integer.
            GitHubApiError: when GitHub refuses the comment or cannot be reached.
        """
        if not self._token:
            raise ConfigError(
                "github_token is empty: set ORBITAL_GITHUB_TOKEN to comment on GitHub"
            )
        validate_repo(repo)
        if type(number) is not int or number <= 0:
            raise ValueError(f"number {number!r}: expected a positive issue or pull request number")
        if len(body) > MAX_COMMENT_CHARS:
            logger.warning(
                "comment on %s#%d is %d characters; cut to GitHub's limit of %d",
                repo, number, len(body), MAX_COMMENT_CHARS,
            )  # fmt: skip
            body = body[: MAX_COMMENT_CHARS - len(_TRUNCATED)] + _TRUNCATED

        data = self.request("POST", f"/repos/{repo}/issues/{number}/comments", {"body": body})
        if not isinstance(data, dict) or type(data.get("id")) is not int:
            raise GitHubApiError(f"GitHub API POST comment on {repo}#{number}: answer has no id")
        return Comment(id=data["id"], url=str(data.get("html_url", "")))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one API call and return the decoded JSON answer (None when empty).

        ``path`` starts with ``/`` and is appended to the base URL; ``body`` is sent
        as JSON when not None.

        Raises:
            GitHubApiError: for an error status (after the retries allowed) or when
                the server cannot be reached; ``status`` is 0 when nothing answered.
        """
        if not path.startswith("/"):
            raise ValueError(f"path {path!r}: must start with '/'")
        data = None if body is None else json.dumps(body).encode("utf-8")
        label = f"GitHub API {method} {path}"
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            try:
                status, raw = self._send(method, path, data)
            except urllib.error.HTTPError as err:
                wait = self._retry_wait(method, err.code, err.headers, attempt)
                error = _api_error(label, err.code, _read(err))
                if wait is None:
                    raise error from None
                logger.warning("%s; retrying in %.1f s (attempt %d of %d)",
                               error, wait, attempt + 1, self.max_attempts)  # fmt: skip
                self._sleep(wait)
                continue
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                unsent = _never_sent(reason)
                if (unsent or method in _IDEMPOTENT) and attempt < self.max_attempts:
                    wait = float(2 ** (attempt - 1))
                    logger.warning("%s: cannot reach %s (%s); retrying in %.0f s",
                                   label, self.base_url, reason, wait)  # fmt: skip
                    self._sleep(wait)
                    continue
                raise GitHubApiError(f"{label}: cannot reach {self.base_url}: {reason}") from None
            logger.info("%s answered %d in %.0f ms", label, status,
                        (time.monotonic() - started) * 1000)  # fmt: skip
            return json.loads(raw) if raw.strip() else None
        raise GitHubApiError(f"{label}: gave up after {self.max_attempts} attempts")

    def _send(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        # The scheme was checked to be http(s) in __init__.
        url = self.base_url + path
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        request.add_header("Accept", "application/vnd.github+json")
        request.add_header("X-GitHub-Api-Version", _API_VERSION)
        request.add_header("User-Agent", f"orbital/{__version__}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_unredirected_header("Authorization", f"Bearer {self._token}")
        with self._opener.open(request, timeout=self.timeout_s) as response:
            return int(response.status), response.read(_MAX_RESPONSE_BYTES)

    def _retry_wait(self, method: str, status: int, headers: Message, attempt: int) -> float | None:
        """Seconds to wait before sending again, or None when this answer is final."""
        if attempt >= self.max_attempts:
            return None
        limited = status == 429 or (
            status == 403
            and (headers.get("Retry-After") or headers.get("x-ratelimit-remaining") == "0")
        )
        if limited:
            wait = _rate_limit_wait(headers)
            return wait if wait <= self.max_wait_s else None
        if status >= 500 and method in _IDEMPOTENT:
            return float(2 ** (attempt - 1))
        return None


def _rate_limit_wait(headers: Message) -> float:
    retry_after = headers.get("Retry-After", "")
    if retry_after.strip().isdigit():
        return float(retry_after.strip())
    reset = headers.get("x-ratelimit-reset", "")
    if reset.strip().isdigit():
        return max(0.0, float(reset.strip()) - time.time()) + 1.0
    return 60.0  # GitHub's advice when it gives no hint


def _never_sent(reason: object) -> bool:
    """Whether a connection error means the request cannot have reached the server."""
    return isinstance(reason, ConnectionRefusedError | socket.gaierror)


def _read(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read(64 * 1024)
    except OSError:
        return b""


def _api_error(label: str, status: int, raw: bytes) -> GitHubApiError:
    message = ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"][:200]
    except ValueError:
        message = raw[:200].decode("utf-8", "replace")
    return GitHubApiError(f"{label} answered {status}: {message or 'no message'}", status=status)
