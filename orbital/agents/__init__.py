"""Agent jobs: an agent CLI session in a fresh checkout, or a papermill runbook.

Register the handler on a worker that serves the ``agent`` queue::

    from orbital.agents import run_agent_job
    from orbital.sync import run_sync_job
    WorkerConfig(..., handlers={JobType.AGENT: run_agent_job, JobType.SYNC: run_sync_job})
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
