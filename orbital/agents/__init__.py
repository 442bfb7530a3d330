"""Agent jobs: an agent CLI session in a fresh checkout, or a papermill runbook.

Register the handlers on a worker that serves the ``agent`` and ``sync`` queues::

    from orbital.agents.manager import manager_handlers
    WorkerConfig(..., handlers=manager_handlers(settings))

(``manager_handlers`` posts agent summaries on GitHub when ``github_token`` is set;
``run_agent_job`` alone never comments.)
"""

from __future__ import annotations

from orbital.agents.failures import FailureContext, read_failure_context
from orbital.agents.handler import CommentHook, agent_argv, make_agent_handler, run_agent_job
from orbital.agents.prompt import MAX_PROMPT_BYTES, Prompt, build_prompt, new_boundary
from orbital.agents.request import ACTIONS, THRESHOLD_ACTIONS, AgentRequest, Thread
from orbital.agents.runbook import find_runbook, run_runbook, runbooks_dir
from orbital.agents.workspace import CommandResult, Workspace, open_workspace

__all__ = [
    "ACTIONS",
    "MAX_PROMPT_BYTES",
    "THRESHOLD_ACTIONS",
    "AgentRequest",
    "CommandResult",
    "CommentHook",
    "FailureContext",
    "Prompt",
    "Thread",
    "Workspace",
    "agent_argv",
    "build_prompt",
    "find_runbook",
    "make_agent_handler",
    "new_boundary",
    "open_workspace",
    "read_failure_context",
    "run_agent_job",
    "run_runbook",
    "runbooks_dir",
]
