"""The steps of a lab run and how their results become a build record.

::

    clone ─> stage 1: BATS unit tests ─> stage 2: post-create ─> post-start ─> integration
                      (any failure skips stage 2)      each step: argv, env, timeout, live log

Every command is an argument list; identifiers were validated at enqueue. The
pipeline never decides on its own to fall back (a missing branch fails the
build). It only talks to the :class:`~orbital.sandboxes.Sandbox` interface, so
the local and Docker sandboxes run a lab the same way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from orbital.jobs import Job, JobType
from orbital.logs import LogWriter
from orbital.masking import mask_text
from orbital.results import (
    ParsedResults,
    Step,
    StepStatus,
    bats_argv,
    bats_count_argv,
    clean_text,
    parse_bats_count,
    parse_bats_output,
    parse_result_jsonl,
)
from orbital.sandboxes.base import Sandbox, StepResult

__all__ = ["LabOutcome", "PipelineConfig", "framework_version_from", "run_lab"]

logger = logging.getLogger(__name__)

UNIT_DIR = ".devcontainer/test/unit"
STAGE2_SCRIPTS = (
    ("post-create", ".devcontainer/post-create.sh"),
    ("post-start", ".devcontainer/post-start.sh"),
)
INTEGRATION = ("integration", ".devcontainer/test/integration.sh")
SUMMARY_LIMIT = 500
_TAIL_BYTES = 4096

#: Called with job fields learned during the run (commit_sha, framework_version).
MetaCallback = Callable[[Mapping[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline needs besides the job and the sandbox."""

    git_url_template: str = "https://github.com/{repo}.git"
    step_timeout_s: float = 1800.0
    secrets: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def git_url(self, repo: str) -> str:
        return self.git_url_template.format(
            repo=repo, owner=repo.split("/")[0], name=repo.split("/")[1]
        )


@dataclass
class LabOutcome:
    """The result of :func:`run_lab`: the build's status and steps."""

    status: str = "passed"
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    commit_sha: str = ""
    framework_version: str = ""
    setup_s: float = 0.0
    run_s: float = 0.0

    @property
    def failed_step(self) -> str:
        first = self._first_failure()
        return first.name if first else ""

    @property
    def failure_summary(self) -> str:
        first = self._first_failure()
        if first is None:
            return ""
        text = first.error or first.description or f"step {first.name} {first.status}"
        return text[:SUMMARY_LIMIT]

    def _first_failure(self) -> Step | None:
        bad = (StepStatus.FAILED, StepStatus.ERROR, StepStatus.TIMED_OUT)
        return next((s for s in self.steps if s.status in bad), None)


class _Run:
    """One lab run's state while its steps execute."""

    def __init__(self, job: Job, sandbox: Sandbox, log: LogWriter, config: PipelineConfig) -> None:
        self.job = job
        self.sandbox = sandbox
        self.log = log
        self.config = config
        self.repo_dir = sandbox.repo_dir(job)
        self.result_json = str(PurePosixPath(sandbox.workspace) / ".orbital" / "result.jsonl")
        self.outcome = LabOutcome()

    def env(self) -> dict[str, str]:
        job = self.job
        env = {
            "CI": "true",
            "ORBITAL_JOB_ID": job.id,
            "ORBITAL_REPOSITORY": job.repo,
            "ORBITAL_BRANCH": job.branch,
            "ORBITAL_ARCH": job.arch,
            "RESULT_JSON": self.result_json,
            "GIT_TERMINAL_PROMPT": "0",
        }
        env.update(self.config.extra_env)
        return env

    async def command(
        self, argv: list[str], *, cwd: str | None = None, capture: bool = False, quiet: bool = False
    ) -> tuple[StepResult, bytes]:
        """Run one command, stream it to the log, and return its result and output
        (all of it when ``capture``, else the last few KB)."""
        kept = bytearray()

        async def on_output(chunk: bytes) -> None:
            if not quiet:
                await self.log.write(chunk)
            kept.extend(chunk)
            if not capture and len(kept) > _TAIL_BYTES * 2:
                del kept[: len(kept) - _TAIL_BYTES]

        result = await self.sandbox.run(
            argv,
            env=self.env(),
            cwd=cwd or self.repo_dir,
            timeout_s=self.config.step_timeout_s,
            on_output=on_output,
        )
        await self.log.flush()
        return result, bytes(kept)

    def record(self, name: str, result: StepResult, output: bytes, started: float) -> Step:
        """Turn a command's result into a step (error: the masked tail of its output)."""
        if result.ok:
            status, error = StepStatus.PASSED, ""
        else:
            status = StepStatus.TIMED_OUT if result.timed_out else StepStatus.FAILED
            if result.cancelled:
                status = StepStatus.CANCELLED
            error = _describe_failure(name, result, output, self.config)
        step = Step(
            name=name,
            status=status,
            duration_s=round(result.duration_s, 3),
            started_at=started,
            finished_at=started + result.duration_s,
            error=error,
            source="pipeline",
        )
        self.outcome.steps.append(step)
        return step

    def skip(self, name: str, why: str) -> None:
        self.outcome.steps.append(
            Step(name=name, status=StepStatus.SKIPPED, description=why, source="pipeline")
        )

    async def banner(self, text: str) -> None:
        await self.log.line(f"==> [orbital] {text}")


def _describe_failure(name: str, result: StepResult, output: bytes, config: PipelineConfig) -> str:
    if result.oom_killed:
        head = f"{name}: killed by the out-of-memory killer"
    elif result.timed_out:
        head = f"{name}: timed out after {config.step_timeout_s:g} s"
    elif result.cancelled:
        head = f"{name}: cancelled"
    else:
        head = f"{name}: exit code {result.exit_code}"
    tail = clean_text(output[-_TAIL_BYTES:], 4000).strip()
    tail = mask_text(tail, config.secrets)
    lines = tail.splitlines()[-15:]
    return head + ("\n" + "\n".join(lines) if lines else "")


async def run_lab(
    job: Job,
    sandbox: Sandbox,
    log: LogWriter,
    config: PipelineConfig,
    on_meta: MetaCallback | None = None,
    outcome: LabOutcome | None = None,
) -> LabOutcome:
    """Run a lab job's pipeline in ``sandbox`` and return its outcome.

    Integration tests run everything; unit tests stop after stage 1; daemon
    jobs run the set-up (post-create, post-start) and skip the integration
    script, leaving the sandbox up for the caller to hold.

    ``outcome``, when given, is filled in as steps finish, so a caller that is
    interrupted still has the steps that ran.
    """
    run = _Run(job, sandbox, log, config)
    if outcome is not None:
        run.outcome = outcome
    t0 = time.monotonic()

    if await _clone(run) and on_meta is not None:
        await on_meta(
            {
                "commit_sha": run.outcome.commit_sha,
                "framework_version": run.outcome.framework_version,
            }
        )
    if run.outcome.status == "passed":
        await _stage1(run)
    run.outcome.setup_s = round(time.monotonic() - t0, 3)

    t1 = time.monotonic()
    if run.outcome.status == "passed" and job.type != JobType.UNIT_TEST:
        await _stage2(run)
    run.outcome.run_s = round(time.monotonic() - t1, 3)
    return run.outcome


def _fail(run: _Run, step: Step) -> None:
    if step.status == StepStatus.TIMED_OUT:
        run.outcome.status = "timed_out"
    elif step.status == StepStatus.CANCELLED:
        run.outcome.status = "cancelled"
    elif run.outcome.status == "passed":
        run.outcome.status = "failed"


async def _clone(run: _Run) -> bool:
    job = run.job
    url = run.config.git_url(job.repo)
    await run.banner(
        f"clone {job.repo} branch {job.branch}" + (f" at {job.commit}" if job.commit else "")
    )
    started = time.time()
    argv = [
        "git",
        "clone",
        "--quiet",
        "--no-tags",
        "--single-branch",
        "--branch",
        job.branch,
        "--",
        url,
        run.repo_dir,
    ]
    result, output = await run.command(argv, cwd=run.sandbox.workspace)
    if result.ok and job.commit:
        checkout = [
            "git",
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--detach",
            job.commit,
            "--",
        ]
        result, output = await run.command(checkout)
    step = run.record("clone", result, output, started)
    if step.status != StepStatus.PASSED:
        _fail(run, step)
        return False

    sha_result, sha = await run.command(["git", "rev-parse", "HEAD"], capture=True, quiet=True)
    run.outcome.commit_sha = sha.decode(errors="replace").strip() if sha_result.ok else ""
    run.outcome.framework_version = await framework_version_from(run.sandbox, run.repo_dir)
    return True


async def _stage1(run: _Run) -> None:
    unit_dir = f"{run.repo_dir}/{UNIT_DIR}"
    listing, out = await run.command(
        ["find", unit_dir, "-maxdepth", "1", "-type", "f", "-name", "*.bats"],
        capture=True,
        quiet=True,
    )
    # Only lines that name a .bats file under the unit directory count: a sandbox
    # may add noise to a command's output, and noise must never become a test file.
    files = sorted(
        PurePosixPath(p).name
        for p in out.decode(errors="replace").split("\n")
        if p.startswith(f"{unit_dir}/") and p.endswith(".bats")
    )
    if not listing.ok or not files:
        return
    await run.banner(f"stage 1: {len(files)} BATS file(s) in {UNIT_DIR}")
    for name in files:
        path = f"{unit_dir}/{name}"
        count_result, count_out = await run.command(bats_count_argv(path), capture=True, quiet=True)
        expected = parse_bats_count(count_out) if count_result.ok else None
        started = time.time()
        result, output = await run.command(bats_argv(path), capture=True)
        parsed = parse_bats_output(name, output, result.exit_code, expected)
        _absorb(run, parsed, started, result)
    if run.outcome.status == "passed":
        return
    for name, _path in (*STAGE2_SCRIPTS, INTEGRATION):
        run.skip(name, "skipped: stage 1 (BATS unit tests) failed")


def _absorb(run: _Run, parsed: ParsedResults, started: float, result: StepResult) -> None:
    for step in parsed.steps:
        if not step.started_at:
            step.started_at = started
        run.outcome.steps.append(step)
        if step.status in (StepStatus.FAILED, StepStatus.ERROR, StepStatus.TIMED_OUT):
            _fail(run, step)
    run.outcome.problems.extend(parsed.problems)
    if result.timed_out or result.cancelled:
        _fail(
            run,
            Step(
                name="bats",
                status=StepStatus.TIMED_OUT if result.timed_out else StepStatus.CANCELLED,
            ),
        )


async def _stage2(run: _Run) -> None:
    await run.sandbox.write_file(run.result_json, b"")
    scripts = list(STAGE2_SCRIPTS)
    if run.job.type != JobType.DAEMON:
        scripts.append(INTEGRATION)
    for index, (name, rel) in enumerate(scripts):
        path = f"{run.repo_dir}/{rel}"
        if await run.sandbox.read_file(path) is None:
            run.skip(name, f"{rel} is not in the repository")
            continue
        await run.banner(f"stage 2: {name} ({rel})")
        started = time.time()
        result, output = await run.command(["bash", path])
        if name == INTEGRATION[0]:
            # Assertions come first: the first failed assertion is the build's failed step.
            _collect_assertions(run, await run.sandbox.read_file(run.result_json) or b"")
        step = run.record(name, result, output, started)
        if step.status != StepStatus.PASSED:
            _fail(run, step)
            for later, _rel in scripts[index + 1 :]:
                run.skip(later, f"skipped: {name} failed")
            return


def _collect_assertions(run: _Run, data: bytes) -> None:
    parsed = parse_result_jsonl(data)
    for step in parsed.steps:
        step.error = mask_text(step.error, run.config.secrets)
        run.outcome.steps.append(step)
        if step.status == StepStatus.FAILED:
            _fail(run, step)
    run.outcome.problems.extend(parsed.problems)


_VERSION_ASSIGN = re.compile(
    rb"""^\s*(?:export\s+)?FRAMEWORK_VERSION\s*=\s*["']?([A-Za-z0-9._-]{1,40})""", re.M
)
_IMAGE_TAG = re.compile(rb'"image"\s*:\s*"[^"]*dt-enablement:([A-Za-z0-9._-]{1,40})"')


async def framework_version_from(sandbox: Sandbox, repo_dir: str) -> str:
    """Return the framework version a checked-out lab declares, or "" if none.

    Looks for ``FRAMEWORK_VERSION=...`` in ``.devcontainer/util/source_framework.sh``
    or ``.devcontainer/util/variables.sh``, then the ``dt-enablement`` image tag in
    ``.devcontainer/devcontainer.json``.
    """
    for rel in (".devcontainer/util/source_framework.sh", ".devcontainer/util/variables.sh"):
        data = await sandbox.read_file(f"{repo_dir}/{rel}")
        match = _VERSION_ASSIGN.search(data or b"")
        if match:
            return match.group(1).decode()
    data = await sandbox.read_file(f"{repo_dir}/.devcontainer/devcontainer.json")
    match = _IMAGE_TAG.search(data or b"")
    return match.group(1).decode() if match else ""
