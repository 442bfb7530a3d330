"""The GitHub REST client against a local HTTP server that records every request
and answers from a script."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from orbital.errors import ConfigError, GitHubApiError, InvalidIdentifierError
from orbital.github.rest import MAX_COMMENT_CHARS, Comment, GitHubClient
from orbital.settings import Settings
from tests.conftest import free_port

TOKEN = "ghp_" + "T" * 36


@dataclass
class Answer:
    status: int = 201
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: Message
    body: bytes


class FakeGitHub:
    """A loopback HTTP server: answers are popped from ``script`` (the last one
    repeats), requests are appended to ``seen``."""

    def __init__(self) -> None:
        self.script: list[Answer] = [Answer(201, {"id": 1, "html_url": "https://x/1"})]
        self.seen: list[Seen] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                fake.seen.append(Seen(self.command, self.path, self.headers, body))
                answer = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                raw = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    """A fake GitHub API on loopback."""
    server = FakeGitHub()
    yield server
    server.close()


@pytest.fixture
def sleeps() -> list[float]:
    """Waits the client asked for, instead of sleeping."""
    return []


def make(github: FakeGitHub, sleeps: list[float], prefix: str = "", **kwargs: Any) -> GitHubClient:
    return GitHubClient(github.url + prefix, TOKEN, sleep=sleeps.append, **kwargs)


def test_post_comment_sends_githubs_request_and_returns_the_comment(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """A comment is a POST to /repos/OWNER/NAME/issues/N/comments with the token,
    GitHub's media type and API version, and a JSON body."""
    github.script = [Answer(201, {"id": 99, "html_url": "https://github.com/o/r/pull/5#c99"})]

    comment = make(github, sleeps).post_comment("o/r", 5, "Review: looks good")

    assert comment == Comment(99, "https://github.com/o/r/pull/5#c99")
    (seen,) = github.seen
    assert (seen.method, seen.path) == ("POST", "/repos/o/r/issues/5/comments")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Accept"] == "application/vnd.github+json"
    assert seen.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"].startswith("orbital/")
    assert json.loads(seen.body) == {"body": "Review: looks good"}


def test_enterprise_base_url_prefix_is_kept(github: FakeGitHub, sleeps: list[float]) -> None:
    """A base URL with a path (GitHub Enterprise's /api/v3) prefixes every call."""
    make(github, sleeps, "/api/v3/").post_comment("o/r", 1, "x")

    assert github.seen[0].path == "/api/v3/repos/o/r/issues/1/comments"


def test_error_answer_is_raised_with_status_and_message_without_retry(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """A 404 becomes GitHubApiError(status 404) with GitHub's message; no retry."""
    github.script = [Answer(404, {"message": "Not Found"})]

    with pytest.raises(GitHubApiError, match="answered 404: Not Found") as caught:
        make(github, sleeps).post_comment("o/r", 1, "x")

    assert caught.value.status == 404
    assert len(github.seen) == 1


def test_rate_limited_request_is_sent_again_after_retry_after(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """A 429 with Retry-After waits that long and sends the comment again."""
    github.script = [Answer(429, {"message": "slow down"}, {"Retry-After": "3"}),
                     Answer(201, {"id": 7})]  # fmt: skip

    assert make(github, sleeps).post_comment("o/r", 1, "x").id == 7
    assert sleeps == [3.0]
    assert len(github.seen) == 2


def test_rate_limit_wait_longer_than_allowed_fails_at_once(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """An exhausted primary rate limit whose reset is far away is not waited for."""
    github.script = [Answer(403, {"message": "API rate limit exceeded"},
                            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "9999999999"})]  # fmt: skip

    with pytest.raises(GitHubApiError, match="rate limit") as caught:
        make(github, sleeps, max_wait_s=30).post_comment("o/r", 1, "x")

    assert caught.value.status == 403
    assert sleeps == []


def test_server_error_retries_reads_but_never_posts_twice(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """A 502 is retried for a GET, but not for a POST (the comment may exist)."""
    github.script = [Answer(502, {"message": "bad gateway"})]
    with pytest.raises(GitHubApiError, match="502"):
        make(github, sleeps).post_comment("o/r", 1, "x")
    assert len(github.seen) == 1

    github.script = [Answer(502, {"message": "bad gateway"}), Answer(200, {"ok": True})]
    assert make(github, sleeps).request("GET", "/rate_limit") == {"ok": True}
    assert len(github.seen) == 3
    assert sleeps == [1.0]


def test_unreachable_server_is_retried_then_reported(sleeps: list[float]) -> None:
    """Connection refused (nothing sent) is retried with backoff, then GitHubApiError
    with status 0."""
    client = GitHubClient(f"http://127.0.0.1:{free_port()}", TOKEN, sleep=sleeps.append)

    with pytest.raises(GitHubApiError, match="cannot reach") as caught:
        client.post_comment("o/r", 1, "x")

    assert caught.value.status == 0
    assert sleeps == [1.0, 2.0]


def test_token_does_not_follow_a_redirect(github: FakeGitHub, sleeps: list[float]) -> None:
    """The token is an unredirected header: a redirect target never receives it."""
    other = FakeGitHub()
    try:
        other.script = [Answer(200, {"moved": True})]
        github.script = [Answer(302, None, {"Location": other.url + "/elsewhere"})]

        assert make(github, sleeps).request("GET", "/repos/o/r") == {"moved": True}

        assert github.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
        assert "Authorization" not in other.seen[0].headers
    finally:
        other.close()


def test_token_never_appears_in_logs_errors_or_repr(
    github: FakeGitHub, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Neither log lines, exception messages nor the client's repr show the token."""
    caplog.set_level(logging.DEBUG)
    client = make(github, sleeps)
    github.script = [Answer(429, {}, {"Retry-After": "1"}), Answer(201, {"id": 1}),
                     Answer(401, {"message": "Bad credentials"})]  # fmt: skip
    client.post_comment("o/r", 1, "x")
    with pytest.raises(GitHubApiError) as caught:
        client.post_comment("o/r", 1, "x")

    assert caplog.messages
    assert TOKEN not in caplog.text
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(client)


def test_overlong_comment_is_cut_to_githubs_limit(github: FakeGitHub, sleeps: list[float]) -> None:
    """A body longer than GitHub accepts is cut, with a note saying so."""
    make(github, sleeps).post_comment("o/r", 1, "y" * (MAX_COMMENT_CHARS + 500))

    sent = json.loads(github.seen[0].body)["body"]
    assert len(sent) == MAX_COMMENT_CHARS
    assert sent.endswith("(truncated by Orbital)")


def test_bad_arguments_are_refused_before_any_request(
    github: FakeGitHub, sleeps: list[float]
) -> None:
    """No token, an invalid repository, a bad number or base URL: refused, nothing sent."""
    with pytest.raises(ConfigError, match="ORBITAL_GITHUB_TOKEN"):
        GitHubClient(github.url, "").post_comment("o/r", 1, "x")
    with pytest.raises(InvalidIdentifierError):
        make(github, sleeps).post_comment("o/r/../x", 1, "x")
    with pytest.raises(ValueError, match="positive"):
        make(github, sleeps).post_comment("o/r", 0, "x")
    with pytest.raises(ConfigError, match="github_api_url"):
        GitHubClient("file:///etc/passwd", TOKEN)
    assert github.seen == []


def test_client_from_settings_uses_the_configured_url_and_token(github: FakeGitHub) -> None:
    """from_settings takes github_api_url and github_token."""
    settings = Settings(github_api_url=github.url, github_token=TOKEN, secret_env=())

    GitHubClient.from_settings(settings).post_comment("o/r", 3, "hi")

    assert github.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
