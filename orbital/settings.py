"""The one place that reads Orbital's configuration.

Values come from environment variables (``ORBITAL_*``), optionally preceded by
a TOML file named by ``ORBITAL_CONFIG`` whose top-level keys are the field
names below. Environment variables win over the file. Nothing else in the
library reads the environment.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orbital.errors import ConfigError

__all__ = ["Settings", "host_arch"]


def host_arch() -> str:
    """Return this machine's architecture in Orbital's names (``amd64`` or ``arm64``)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


@dataclass(frozen=True)
class Settings:
    """Orbital's configuration.

    Every field can be set with the environment variable ``ORBITAL_<FIELD>`` in
    upper case (lists are comma-separated). Durations are seconds.
    """

    #: Redis URL shared by every process; empty starts the embedded Redis.
    redis_url: str = ""
    #: Prefix of every Redis key Orbital writes.
    prefix: str = "orbital"
    #: Orbital's home: embedded Redis data, log archives, work directories.
    home: Path = field(default_factory=lambda: Path.home() / ".orbital")
    #: The fleet registry; empty means none is configured.
    fleet_file: str = ""
    #: How a repository's clone URL is built; ``{repo}`` is ``owner/name``.
    git_url_template: str = "https://github.com/{repo}.git"
    #: Names of environment variables whose values are masked in every log.
    secret_env: tuple[str, ...] = ("GITHUB_TOKEN", "DT_API_TOKEN", "ORBITAL_WEBHOOK_SECRET")
    #: Literal secret values to mask (in addition to ``secret_env``).
    secrets: tuple[str, ...] = ()
    #: A claimed job's lease; a worker renews it every third of this.
    lease_s: float = 30.0
    #: How long a worker's registration lives without a heartbeat.
    heartbeat_ttl_s: float = 30.0
    #: Attempts before a job whose workers keep dying ends as lost.
    max_attempts: int = 3
    #: Default timeouts.
    job_timeout_s: float = 3600.0
    step_timeout_s: float = 1800.0
    #: Nightly schedule (cron, UTC) and the gap between enqueues on one arch queue.
    nightly_cron: str = "0 2 * * *"
    nightly_stagger_s: float = 300.0
    #: How long a finished job's live log stays in Redis (the archive stays on disk).
    log_ttl_s: float = 86400.0
    #: Live log cap per job, in stream entries.
    log_max_entries: int = 100_000
    #: Which sandbox a worker uses: ``local`` or ``docker``.
    sandbox: str = "local"
    #: Docker sandbox: the engine the worker drives (outer containers run there).
    docker_host: str = "unix:///var/run/docker.sock"
    #: ``sysbox``: outer containers under ``docker_runtime`` with no added privileges;
    #: ``nested-docker``: the engine's default runtime plus only the capabilities nested
    #: Docker needs (SYS_ADMIN, NET_ADMIN, no seccomp filter), never --privileged. Weaker.
    docker_isolation: str = "sysbox"
    docker_runtime: str = "sysbox-runc"
    #: The slot's outer image (runs its own Docker daemon) and the lab (framework) image.
    docker_outer_image: str = "docker:25-dind"
    docker_lab_image: str = "shinojosa/dt-enablement:v1.2"
    #: Limits of each slot (its outer container and everything inside it).
    docker_memory: str = "8g"
    docker_cpus: float = 2.0
    docker_pids_limit: int = 4096
    #: Slot i publishes port ``docker_port_base + i`` on ``docker_bind_address``; the lab
    #: gets it as K3D_LB_HTTP_PORT.
    docker_port_base: int = 30080
    docker_bind_address: str = "127.0.0.1"
    #: Warm-up: slots built at once, and attempts per slot before it is reported failed.
    docker_warm_concurrency: int = 2
    docker_warm_attempts: int = 3
    #: Host directory holding each slot's inner Docker socket; empty means ``<home>/slots``.
    docker_slot_dir: str = ""
    #: Host paths mounted read-only at the same path into every lab (``/srv/git`` or
    #: ``/srv/git:/mirror``), e.g. a git mirror that ``git_url_template`` points into.
    docker_lab_mounts: tuple[str, ...] = ()
    #: Timeout of one Docker API call, and attempts to kill before giving up on a container.
    docker_api_timeout_s: float = 30.0
    docker_kill_attempts: int = 3
    #: How long a new slot's inner daemon may take to answer.
    docker_ready_timeout_s: float = 90.0
    #: Background rebuild of an unhealthy slot: first delay, doubling up to the maximum.
    docker_rebuild_backoff_s: float = 2.0
    docker_rebuild_backoff_max_s: float = 120.0
    #: How often idle warm slots are checked (a dead one is rebuilt).
    docker_health_interval_s: float = 15.0
    #: Dynatrace environment the shipper posts business events to: the URL before
    #: ``/api/v2/bizevents/ingest``, e.g. ``https://abc12345.live.dynatrace.com`` or an
    #: ActiveGate's ``https://activegate:9999/e/<environment id>``.
    dt_environment: str = ""
    #: Access token with the ``bizevents.ingest`` scope. A secret: kept out of repr and
    #: logs, and masked wherever ``secret_values`` is used.
    dt_api_token: str = field(default="", repr=False)
    #: Shipper: events per ingest request at most, and request body bytes at most.
    shipper_batch_size: int = 500
    shipper_max_batch_bytes: int = 1_000_000
    #: Shipper: timeout of one ingest request. A request that times out is sent again,
    #: so keep this well above the ingest API's slowest answer.
    shipper_timeout_s: float = 30.0
    #: Shipper: retry delay after a 429, 5xx or network error: the first delay, doubled on
    #: each retry (with jitter) up to the maximum. A Retry-After header wins.
    shipper_backoff_s: float = 0.5
    shipper_backoff_max_s: float = 60.0
    #: Shipper: how long one read of an empty outbox blocks.
    shipper_poll_s: float = 1.0
    #: Shipper: lease of the lock that lets one shipper at a time send (others stand by;
    #: one takes over this long after the sender died).
    shipper_lock_ttl_s: float = 15.0
    #: Shipper: its consumer name in the outbox's consumer group (empty: the host name).
    shipper_name: str = ""
    #: Workers emit a ``worker.heartbeat`` event on every Nth heartbeat, not on each.
    heartbeat_event_every: int = 10
    #: GitHub webhook receiver: the shared secret GitHub signs deliveries with (the
    #: service refuses to start without it; a secret, kept out of repr and masked in
    #: logs), and where it listens.
    webhook_secret: str = field(default="", repr=False)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8787
    #: Largest delivery body accepted. GitHub caps payloads at 25 MB, but the events
    #: Orbital routes are far smaller, and a body is buffered whole before it is verified.
    webhook_max_body_bytes: int = 2 * 1024 * 1024
    #: A YAML or JSON routing table replacing the built-in one; empty uses the default.
    webhook_routing_file: str = ""
    #: How long an accepted X-GitHub-Delivery id is remembered (GitHub redelivers on
    #: request for a few days), and how long a "once per issue" job stays claimed.
    webhook_dedupe_ttl_s: float = 7 * 86400.0
    webhook_once_ttl_s: float = 180 * 86400.0
    #: GitHub REST API (GitHub Enterprise: ``https://HOST/api/v3``) and the token used
    #: for comments. A secret: kept out of repr and masked wherever ``secret_values`` is.
    github_api_url: str = "https://api.github.com"
    github_token: str = field(default="", repr=False)
    #: Agent jobs: the agent command as an argument list (never a shell string). The
    #: element ``{prompt}`` is replaced by the prompt and ``{prompt_file}`` by the path of
    #: a file holding it; with neither, the prompt is appended as the last argument.
    #: The default is the Claude Code CLI in print mode.
    agent_command: tuple[str, ...] = ("claude", "-p", "--output-format", "text", "{prompt}")
    #: Agent jobs: how long the agent command (or a runbook) may run before its whole
    #: process tree is killed.
    agent_timeout_s: float = 1800.0
    #: Agent jobs: environment variables handed from the worker to the agent command
    #: (credentials, for instance); their values are masked in the job log.
    agent_env: tuple[str, ...] = ("ANTHROPIC_API_KEY",)
    #: fix-ci and diagnose act only when the same repository + branch + arch has failed
    #: at least this many times in a row; otherwise the job ends passed as skipped.
    diagnose_min_failures: int = 2
    #: Agent jobs: bytes of the last failed build's log given to the agent.
    agent_log_tail_bytes: int = 12_000
    #: Where runbooks (papermill notebooks) live; empty: ``runbooks/`` of the source
    #: checkout the orbital package is installed from.
    runbooks_dir: str = ""
    #: Agent actions that run a runbook instead of the agent command, as
    #: ``action=notebook.ipynb`` (e.g. ``diagnose=diagnose.ipynb``).
    agent_runbooks: tuple[str, ...] = ()
    #: Jupyter kernel runbooks run on; empty: the kernel the notebook names.
    runbook_kernel: str = ""
    #: Sync: the framework repository (``owner/name``, cloned through
    #: ``git_url_template``) whose newest ``v*`` release tag is the target version.
    framework_repo: str = "dynatrace-wwse/codespaces-framework"
    #: Sync: a fixed target framework version; empty: the newest release tag.
    framework_target_version: str = ""
    #: Sync: when the scheduler queues a drift check (cron, UTC); empty: never.
    sync_cron: str = "0 * * * *"
    #: Sync: repositories read at once, and the time limit of one git command.
    sync_concurrency: int = 4
    sync_git_timeout_s: float = 120.0
    #: Scheduler service: seconds between passes (nightly slot check, drift check).
    scheduler_tick_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``ORBITAL_CONFIG`` (a TOML file), then the environment,
        then ``overrides``.

        Raises:
            ConfigError: naming the variable and the value it could not use.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_file = env.get("ORBITAL_CONFIG", "")
        if config_file:
            values.update(_read_config_file(Path(config_file)))

        for f in dataclasses.fields(cls):
            name = f"ORBITAL_{f.name.upper()}"
            if name in env:
                values[f.name] = env[name]

        values.update(overrides)
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    def secret_values(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Return the secret values to mask: configured literals, the values of the
        variables named in ``secret_env``, the Dynatrace token, the webhook secret and
        the GitHub token (empty values are ignored)."""
        env = os.environ if environ is None else environ
        values = [v for v in self.secrets if v]
        values += [env[n] for n in self.secret_env if env.get(n)]
        values += [v for v in (self.dt_api_token, self.webhook_secret, self.github_token) if v]
        return values

    def agent_environment(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the variables named in ``agent_env`` that are set (non-empty), for
        the agent command's environment."""
        env = os.environ if environ is None else environ
        return {name: env[name] for name in self.agent_env if env.get(name)}

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"ORBITAL_CONFIG={path}: cannot read it: {err}") from None
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"ORBITAL_CONFIG={path}: unknown settings {', '.join(unknown)}")
    return data


#: Float settings where 0 is meaningful (no gap between staggered enqueues).
_ZERO_ALLOWED = frozenset({"nightly_stagger_s"})
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_text(name: str, value: str) -> str:
    """Refuse text settings that could only fail later, far from their cause."""
    if name == "prefix" and not _PREFIX.fullmatch(value):
        raise ValueError("expected 1-64 letters, digits, '_', '.' or '-' (no spaces, ':' or '*')")
    if name == "redis_url" and value and not value.startswith(_REDIS_SCHEMES):
        raise ValueError(
            "expected a redis://, rediss:// or unix:// URL, or empty for the embedded Redis"
        )
    if name.endswith("_cron") and value:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError("not a cron expression (five fields, UTC)")
    return value


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if name not in types:
        raise ConfigError(f"unknown setting {name!r}")
    kind = str(types[name])
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("must be a finite number of seconds")
            if number < 0 or (number == 0 and name not in _ZERO_ALLOWED):
                raise ValueError(
                    "must be positive" if name not in _ZERO_ALLOWED else "must not be negative"
                )
            return number
        if kind == "int":
            number = int(value)
            if number <= 0:
                raise ValueError("must be positive")
            return number
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        return _check_text(name, str(value))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"setting {name} (ORBITAL_{name.upper()}) = {value!r}: {err}") from None
