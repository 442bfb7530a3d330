"""Talking to a Docker engine: Orbital's labels, error types, bounded removal,
leftover cleanup, and the outer container's boot script.

Shared by the slot (:mod:`orbital.sandboxes.docker_slot`), the pool and the
provider. Every function blocks (Docker SDK calls); callers run them in threads.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import time
from collections.abc import Mapping

import docker
import docker.errors

from orbital.errors import SandboxError
from orbital.settings import Settings

__all__ = [
    "BOOT_SCRIPT",
    "DOCKER_ERRORS",
    "LABEL",
    "LAB_NAME",
    "LEASE_POLL_S",
    "LEASE_WATCHDOG",
    "WORKSPACES",
    "engine_ready",
    "env_file",
    "file_archive",
    "git_url_mounts",
    "orbital_labels",
    "parse_lab_mounts",
    "remove_container",
    "remove_leftovers",
]

logger = logging.getLogger(__name__)

LABEL = "org.orbital"
LAB_NAME = "orbital-lab"
WORKSPACES = "/workspaces"
#: What a Docker SDK call raises: the SDK's errors, and requests' transport errors
#: (timeouts, refused connections), which are OSErrors.
DOCKER_ERRORS = (docker.errors.DockerException, OSError)

# The outer container's entrypoint. Under the default runtime Docker mounts /sys and
# the cgroup file systems read-only; the inner daemon needs them writable (it is a
# bind remount of this container's own view, which needs CAP_SYS_ADMIN). On cgroup v2
# the processes move into a child group first, since a group holding processes
# cannot hand controllers to children. The script then runs the image's dind
# entrypoint when there is one (docker:*-dind) or dockerd itself.
BOOT_SCRIPT = """set -e
if [ "$ORBITAL_REMOUNT" = 1 ]; then
    mount -o remount,rw /sys 2>/dev/null || mount -o remount,bind,rw /sys
    for m in $(awk '$3 ~ /^cgroup/ {print $2}' /proc/self/mounts); do
        mount -o remount,bind,rw,nosuid,nodev,noexec "$m"
    done
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        mkdir -p /sys/fs/cgroup/orbital-boot
        for p in $(cat /sys/fs/cgroup/cgroup.procs); do
            echo "$p" > /sys/fs/cgroup/orbital-boot/cgroup.procs 2>/dev/null || true
        done
        for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
            echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        done
    fi
fi
mkdir -p /workspaces /run/orbital
chmod 0777 /workspaces
rm -f /run/orbital/docker.sock
set -- dockerd --host=unix:///var/run/docker.sock --host=unix:///run/orbital/docker.sock
if command -v dockerd-entrypoint.sh >/dev/null 2>&1; then
    exec dockerd-entrypoint.sh "$@"
fi
exec "$@"
"""


# Runs detached in the outer container while a job holds the slot, once the worker has
# renewed the job's lease. The worker writes a new count into the lease file (in the host
# directory bind-mounted at /run/orbital) at every renewal; when the count stays the same
# for $2 polls of 0.5 s (the worker is paused, dead, or cut off from Redis), the lab
# container is killed, so the job never runs twice once the reaper hands it to another
# worker. Content, not mtime: mtimes have one-second steps. Removing the file (the job
# ended) stops the watchdog.
LEASE_WATCHDOG = """f=/run/orbital/lease; lab=$1; polls=$2; last=""; idle=0
while sleep 0.5; do
    now=$(cat "$f" 2>/dev/null) || exit 0
    if [ "$now" = "$last" ]; then idle=$((idle + 1)); else idle=0; last=$now; fi
    if [ "$idle" -ge "$polls" ]; then
        docker -H unix:///run/orbital/docker.sock kill "$lab" >/dev/null 2>&1
        rm -f "$f"
        exit 0
    fi
done
"""
#: The watchdog's poll interval.
LEASE_POLL_S = 0.5


def orbital_labels(prefix: str, worker: str, slot: int | str, job: str = "") -> dict[str, str]:
    """Return the labels every Orbital container and volume carries."""
    return {
        f"{LABEL}.managed": prefix,
        f"{LABEL}.worker": worker,
        f"{LABEL}.slot": str(slot),
        f"{LABEL}.job": job,
    }


def remove_container(
    client: docker.APIClient, container: str, attempts: int, *, volumes: bool = False
) -> bool:
    """Force-remove a container, at most ``attempts`` times. True when it is gone."""
    if not container:
        return True
    for attempt in range(1, attempts + 1):
        try:
            client.remove_container(container, force=True, v=volumes)
            return True
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as err:
            if err.status_code == 409 and "already in progress" in str(err):
                time.sleep(0.5 * attempt)
                continue
            logger.warning(
                "container %s: removal refused (attempt %d of %d): %s",
                container[:40],
                attempt,
                attempts,
                err,
            )
        except DOCKER_ERRORS as err:
            logger.warning(
                "container %s: removal failed (attempt %d of %d): %s",
                container[:40],
                attempt,
                attempts,
                err,
            )
        time.sleep(0.5 * attempt)
    return False


def remove_leftovers(
    host: docker.APIClient, prefix: str, worker_id: str | None, attempts: int = 3
) -> list[str]:
    """Remove containers and volumes a previous run of ``worker_id`` left on the engine
    (every Orbital worker's when ``worker_id`` is None). Returns the names removed."""
    filters = [f"{LABEL}.managed={prefix}"]
    if worker_id is not None:
        filters.append(f"{LABEL}.worker={worker_id}")
    removed: list[str] = []
    for container in host.containers(all=True, filters={"label": filters}):
        name = container["Names"][0].lstrip("/")
        if remove_container(host, container["Id"], attempts, volumes=True):
            removed.append(name)
    for volume in host.volumes(filters={"label": filters}).get("Volumes") or []:
        try:
            host.remove_volume(volume["Name"], force=True)
            removed.append(volume["Name"])
        except DOCKER_ERRORS as err:
            logger.warning("volume %s: leftover not removed: %s", volume["Name"], err)
    return removed


def file_archive(path: str, data: bytes, mode: int = 0o644) -> bytes:
    """A tar archive holding one file at ``path`` (relative to ``/``), for put_archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parse_lab_mounts(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Turn ``docker_lab_mounts`` entries (``/host`` or ``/host:/lab``) into pairs.

    Raises:
        SandboxError: naming an entry that is not an absolute path.
    """
    pairs = []
    for value in values:
        source, _, target = value.partition(":")
        target = target or source
        if not source.startswith("/") or not target.startswith("/"):
            raise SandboxError(
                f"docker_lab_mounts: {value!r} is not an absolute path (or /host:/lab)"
            )
        pairs.append((source, target))
    return tuple(pairs)


def env_file(env: Mapping[str, str]) -> bytes:
    """Render ``env`` as a Docker env file (one KEY=value a line)."""
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode()


def engine_ready(settings: Settings, timeout_s: float = 5.0) -> tuple[bool, str]:
    """Whether the engine at ``docker_host`` answers and holds the outer and lab images
    (what ``--sandbox auto`` needs to pick Docker), and a sentence saying why."""
    url = settings.docker_host
    try:
        client = docker.APIClient(base_url=url, timeout=max(int(timeout_s), 1))
    except DOCKER_ERRORS as err:
        return False, f"no Docker engine answers at {url} ({err})"
    try:
        for image in (settings.docker_outer_image, settings.docker_lab_image):
            try:
                client.inspect_image(image)
            except docker.errors.ImageNotFound:
                return False, f"the Docker engine at {url} lacks the image {image!r}"
    except DOCKER_ERRORS as err:
        return False, f"the Docker engine at {url} failed to answer: {err}"
    finally:
        client.close()
    return True, f"docker ({settings.docker_isolation}) at {url}"


def git_url_mounts(template: str) -> tuple[tuple[str, str], ...]:
    """A ``file://`` git URL template points at host directories the lab cannot see;
    mount the directory holding its repositories read-only at the same path."""
    if not template.startswith("file://"):
        return ()
    static = template[len("file://") :].split("{", 1)[0]
    directory = (static if static.endswith("/") else posixpath.dirname(static)).rstrip("/")
    if not directory.startswith("/") or directory.count("/") < 2:
        return ()  # never the root or a top-level directory such as /home
    return ((directory, directory),)
