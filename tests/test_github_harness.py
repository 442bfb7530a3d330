"""Shared helpers for the GitHub webhook tests: a receiver running on loopback in a
background thread, signed requests sent with http.client, and payload editing.

This module holds no tests itself; the ``test_github_*`` modules import it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orbital.github.signature import sign
from orbital.jobs import Job
from orbital.queue import Queue
from orbital.settings import Settings

try:
    from orbital.github.app import WebhookService, serve
except ImportError:  # only without the webhook extra; CI must have it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(
        "the webhook receiver needs the webhook extra: pip install -e '.[webhook]'",
        allow_module_level=True,
    )

SECRET = "test-webhook-secret-0123456789"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

#: The fleet the tests use: the payloads' repository on both arches, plus variants.
DEFAULT_FLEET = [
    {"name": "hello-world", "repo": "Codertocat/Hello-World", "status": "active"},
    {"name": "amd-only", "repo": "Codertocat/amd-only", "status": "active", "arch": "amd64"},
    {"name": "no-ci", "repo": "Codertocat/no-ci", "status": "active", "ci": False},
    {"name": "old-lab", "repo": "Codertocat/old-lab", "status": "archived"},
]


def write_fleet(path: Path, entries: list[dict[str, Any]] | None = None) -> Path:
    """Write a repos.yaml registry and return its path."""
    path.write_text(yaml.safe_dump({"repos": entries or DEFAULT_FLEET}))
    return path


def payload(shared_dir: Path, name: str) -> dict[str, Any]:
    """A real payload from ../shared/webhooks, decoded (for editing)."""
    data: dict[str, Any] = json.loads((shared_dir / "webhooks" / name).read_text())
    return data


def raw_payload(shared_dir: Path, name: str) -> bytes:
    """A real payload's exact bytes."""
    return (shared_dir / "webhooks" / name).read_bytes()


def headers(
    body: bytes,
    event: str,
    *,
    delivery: str | None = None,
    content_type: str = JSON,
    secret: str = SECRET,
) -> dict[str, str]:
    """Headers GitHub would send for ``body``, signed with ``secret``."""
    return {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(secret.encode(), body),
        "User-Agent": "GitHub-Hookshot/test",
    }


class Receiver:
    """A webhook receiver serving on 127.0.0.1 from a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = settings.webhook_port
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="webhook-receiver", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(self.settings, self._stop, service=WebhookService(self.settings),
                        on_ready=self._ready.set)  # fmt: skip

        try:
            self._loop.run_until_complete(main())
        except BaseException as err:
            self._error = err
            self._ready.set()
        finally:
            self._loop.close()

    def start(self) -> Receiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the webhook receiver did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def request(
        self, method: str, path: str, body: bytes = b"", hdrs: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one request on a fresh connection; return status and decoded JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=hdrs or {})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"text": raw.decode("utf-8", "replace")}
        return response.status, data

    def post(self, body: bytes, event: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """POST a delivery signed like GitHub would (kwargs go to :func:`headers`)."""
        return self.request("POST", "/webhook", body, headers(body, event, **kwargs))


def receiver_settings(settings: Settings, port: int, **changes: Any) -> Settings:
    """The test settings with a webhook secret, a port and ``changes``."""
    return dataclasses.replace(settings, webhook_secret=SECRET, webhook_port=port, **changes)


def active_jobs(client: redis.Redis, settings: Settings) -> list[Job]:
    """Every job waiting or running under the test's prefix."""
    return Queue(client, settings).active_jobs()


def job_summary(jobs: list[Job]) -> list[tuple[str, str, str, str, str, str]]:
    """(type, action, repo, branch, commit, arch) per job, sorted: easy to compare."""
    return sorted(
        (j.type.value, str(j.params.get("action", "")), j.repo, j.branch, j.commit, j.arch)
        for j in jobs
    )


def edited(data: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> bytes:
    """A copy of ``data`` changed by ``change``, encoded as GitHub would send it."""
    copy: dict[str, Any] = json.loads(json.dumps(data))
    change(copy)
    return json.dumps(copy).encode()
