"""Agent summaries are posted through the real GitHub REST client to a local HTTP
server standing in for the API; a failing API does not fail the job."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from orbital.agents.manager import github_comment_hook, manager_handlers
from orbital.keys import Keys
from orbital.logs import read_log
from orbital.queue import Queue
from orbital.settings import Settings
from tests.test_agents import agent_job, agent_settings, ended, lab_repo, run_manager  # noqa: F401

TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"

pytestmark = pytest.mark.anyio


class FakeGitHub(ThreadingHTTPServer):
    """Records comment POSTs; answers 201, or ``status`` when set."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.status = 201

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeGitHub

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        self.server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": body}
        )
        status = self.server.status
        answer = json.dumps(
            {"id": 1, "html_url": "https://github.invalid/c/1"} if status == 201 else {}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    server = FakeGitHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_no_token_means_no_comments(settings: Settings) -> None:
    """Without a GitHub token agents do not try to comment."""
    assert github_comment_hook(settings) is None


async def test_agent_summary_is_posted_on_the_issue(
    agent_settings: Settings,  # noqa: F811
    client: redis.Redis,
    github: FakeGitHub,
) -> None:
    """The manager's agent handler posts its summary on the job's issue with the token,
    which never reaches the job log."""
    settings = dataclasses.replace(agent_settings, github_api_url=github.url, github_token=TOKEN)
    queue = Queue(client, settings)
    job = agent_job(action="fix-issue", issue_number=12, issue_title="Broken")
    queue.enqueue(job)
    await run_manager(settings, ended(queue, job), handlers=manager_handlers(settings))

    assert queue.get_job(job.id).state == "passed"
    [posted] = github.requests
    assert posted["path"] == "/repos/acme/lab/issues/12/comments"
    assert posted["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert posted["body"]["body"].startswith(f"Orbital fix-issue (done, job `{job.id}`)")
    assert "Fixed: the greeting script prints hello again." in posted["body"]["body"]
    assert TOKEN not in read_log(client, Keys(settings.prefix), job.id).decode()


async def test_a_refused_comment_leaves_the_job_result_alone(
    agent_settings: Settings,  # noqa: F811
    client: redis.Redis,
    github: FakeGitHub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When GitHub refuses the comment the job still passes and a warning says so."""
    github.status = 422
    settings = dataclasses.replace(agent_settings, github_api_url=github.url, github_token=TOKEN)
    queue = Queue(client, settings)
    job = agent_job(action="review-pr", pr_number=4, pr_title="Change")
    queue.enqueue(job)
    await run_manager(settings, ended(queue, job), handlers=manager_handlers(settings))

    assert queue.get_job(job.id).state == "passed"
    assert len(github.requests) == 1
    assert any(
        "cannot comment on pull request #4 of acme/lab" in r.getMessage() for r in caplog.records
    )
    assert Path(settings.agent_command[0]).exists()
