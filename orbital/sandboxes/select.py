"""Choosing and building a worker's sandbox provider from configuration."""

from __future__ import annotations

from collections.abc import Callable

from orbital.errors import ConfigError
from orbital.sandboxes.base import SandboxProvider
from orbital.sandboxes.local import LocalSandboxProvider
from orbital.settings import Settings

__all__ = ["choose_provider", "make_provider"]

#: The local watchdog kills a step when renewals stopped for this share of the
#: lease, so it is dead before the reaper can hand the job to another worker.
LEASE_GRACE_SHARE = 0.6

ProviderFactory = Callable[[Settings, str], SandboxProvider]


def make_provider(settings: Settings, kind: str, worker_id: str | None) -> SandboxProvider:
    """Return the provider of ``kind`` (``local`` or ``docker``) for one worker."""
    factory, _ = choose_provider(settings, kind)
    return factory(settings, worker_id or "worker")


def choose_provider(settings: Settings, kind: str) -> tuple[ProviderFactory, str]:
    """Return a provider factory and a sentence saying which sandbox was chosen and why.

    ``auto`` picks Docker when an engine answers, else the local sandbox.

    Raises:
        ConfigError: for an unknown kind.
    """
    if kind == "local":
        return _local, "local (child processes; not an isolation boundary)"
    if kind not in ("docker", "auto"):
        raise ConfigError(
            f"sandbox {kind!r} is unknown: expected local or docker (or auto for the demo)"
        )
    from orbital.sandboxes.docker import DockerSandboxProvider
    from orbital.sandboxes.docker_engine import engine_ready

    if kind == "docker":
        return (
            DockerSandboxProvider,
            f"docker ({settings.docker_isolation}) at {settings.docker_host}",
        )
    ready, reason = engine_ready(settings)
    if ready:
        return DockerSandboxProvider, reason
    return _local, f"local, since {reason} (child processes; not an isolation boundary)"


def _local(settings: Settings, worker_id: str) -> SandboxProvider:
    return LocalSandboxProvider(
        settings.work_dir, worker_id, lease_grace_s=settings.lease_s * LEASE_GRACE_SHARE
    )
