"""Running a papermill runbook from ``runbooks/`` as an agent job.

papermill runs as a child process of the job's workspace, like the agent
command: one process group with a timeout, output (cells' output included,
``--log-output``) streamed to the job log. The run's result is papermill's
exit status, never the saved notebook: when the kernel dies, papermill exits
non-zero but the notebook it leaves can look like a clean run.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from orbital.agents.workspace import CommandResult, Workspace
from orbital.errors import JobParamsError
from orbital.settings import Settings

__all__ = ["find_runbook", "run_runbook", "runbook_argv", "runbooks_dir"]


def runbooks_dir(settings: Settings) -> Path:
    """Return the directory runbooks are read from: ``runbooks_dir``, else
    ``runbooks/`` of the source checkout this package is installed from."""
    if settings.runbooks_dir:
        return Path(settings.runbooks_dir).expanduser()
    return Path(__file__).resolve().parents[2] / "runbooks"


def find_runbook(settings: Settings, name: str) -> Path:
    """Return the path of runbook ``name`` (a plain file name, already validated).

    Raises:
        JobParamsError: if no such notebook is in the runbooks directory.
    """
    folder = runbooks_dir(settings).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise JobParamsError(
            f"runbook {name!r} is not in {folder} (set runbooks_dir / ORBITAL_RUNBOOKS_DIR, "
            "or name a notebook that exists there)"
        )
    return path


def runbook_argv(
    notebook: Path, output: Path, parameters_file: Path, cwd: Path, kernel: str = ""
) -> list[str]:
    """Return papermill's command line for one run."""
    argv = [
        sys.executable,
        "-m",
        "papermill",
        str(notebook),
        str(output),
        "--parameters_file",
        str(parameters_file),
        "--cwd",
        str(cwd),
        "--log-output",
        "--no-progress-bar",
    ]
    if kernel:
        argv += ["--kernel", kernel]
    return argv


async def run_runbook(
    workspace: Workspace,
    notebook: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    timeout_s: float,
    kernel: str = "",
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Execute ``notebook`` with ``parameters`` and save the executed copy to ``output``.

    Parameters go to papermill in a YAML file, so no value is ever parsed from a
    command line. The kernel runs in the workspace's checkouts directory.

    Raises:
        JobParamsError: if a parameter value cannot be written as YAML.
    """
    parameters_file = workspace.root / "parameters.yaml"
    try:
        text = yaml.safe_dump(dict(parameters), allow_unicode=True, sort_keys=True)
    except yaml.YAMLError as err:
        raise JobParamsError(
            f"runbook {notebook.name}: parameters cannot be written as YAML: {err}"
        ) from None
    parameters_file.write_text(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = runbook_argv(notebook, output, parameters_file, workspace.checkouts, kernel)
    return await workspace.run(argv, timeout_s=timeout_s, env=env)
