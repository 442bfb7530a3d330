"""The handlers a manager worker registers: agent jobs (commenting on GitHub when
a token is configured) and sync jobs.

::

    from orbital.agents.manager import manager_handlers
    WorkerConfig(arch=..., capacity={..., "agent": 1, "sync": 1},
                 handlers=manager_handlers(settings))
"""

from __future__ import annotations

import logging

import anyio

from orbital.agents.handler import CommentHook, make_agent_handler
from orbital.github.rest import GitHubClient
from orbital.jobs import JobType
from orbital.settings import Settings
from orbital.sync.handler import run_sync_job
from orbital.workers.runner import JobHandler

__all__ = ["github_comment_hook", "manager_handlers"]

logger = logging.getLogger(__name__)


def github_comment_hook(settings: Settings) -> CommentHook | None:
    """Return a hook that posts agent summaries through the GitHub REST client, or
    None when no ``github_token`` is configured (agents then do not comment)."""
    if not settings.github_token:
        return None
    client = GitHubClient.from_settings(settings)

    async def comment(repo: str, number: int, body: str) -> None:
        posted = await anyio.to_thread.run_sync(client.post_comment, repo, number, body)
        logger.info("agent comment on %s#%d posted: %s", repo, number, posted.url)

    return comment


def manager_handlers(settings: Settings) -> dict[JobType, JobHandler]:
    """The handlers for the ``agent`` and ``sync`` queues."""
    return {
        JobType.AGENT: make_agent_handler(github_comment_hook(settings)),
        JobType.SYNC: run_sync_job,
    }
