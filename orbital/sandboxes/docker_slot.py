"""One warm slot of the Docker sandbox: an outer container with its own Docker daemon.

::

    host engine ── outer container  orbital-<worker>-slot<i>-<gen>   (limits, one port)
                    ├── inner dockerd  (socket bind-mounted to <slot_dir>/<worker>-<i>/)
                    ├── /workspaces    (the job's files; mounted into the lab)
                    └── lab container  (the framework image, one per job, host network of
                                        the outer container, the inner daemon's socket)

The worker reaches each inner daemon through its socket in a host directory, so
the worker must run on the engine's host. Every method here blocks (Docker SDK
calls); the pool runs them in worker threads. Every container and volume carries
the labels of :func:`~orbital.sandboxes.docker_engine.orbital_labels`, so a crashed
worker's leftovers are found by :func:`~orbital.sandboxes.docker_engine.remove_leftovers`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from orbital.errors import SandboxError
from orbital.sandboxes.docker_engine import (
    BOOT_SCRIPT,
    DOCKER_ERRORS,
    WORKSPACES,
    file_archive,
    orbital_labels,
    remove_container,
)

__all__ = ["Slot", "SlotConfig"]

logger = logging.getLogger(__name__)

_SOCKET_DIR = "/run/orbital"
_SOCKET_MAX = 100  # sun_path holds 108 bytes; keep a margin
_LOAD_TIMEOUT_S = 900
_DEFAULT_NETWORKS = {"bridge", "host", "none"}


@dataclass(frozen=True)
class SlotConfig:
    """What every slot of one provider shares (read from settings once)."""

    prefix: str
    worker_id: str
    isolation: str
    runtime: str
    outer_image: str
    lab_image: str
    memory: str
    cpus: float
    pids_limit: int
    port_base: int
    bind_address: str
    slot_dir: Path
    lab_mounts: tuple[tuple[str, str], ...]
    api_timeout_s: float
    ready_timeout_s: float
    kill_attempts: int
    lease_grace_s: float = 18.0


class Slot:
    """One outer container and its inner daemon (see the module docstring)."""

    def __init__(self, index: int, config: SlotConfig, host: docker.APIClient) -> None:
        self.index = index
        self.config = config
        self.host = host
        self.port = config.port_base + index
        safe_worker = "".join(c if c.isalnum() or c in "-_." else "-" for c in config.worker_id)
        self.base_name = f"orbital-{safe_worker}-slot{index}"
        self.socket_dir = config.slot_dir / f"{safe_worker}-{index}"
        self.socket_path = str(self.socket_dir / "docker.sock")
        #: Touched by the worker at each lease renewal; watched inside the slot.
        self.lease_file = self.socket_dir / "lease"
        if len(self.socket_path) > _SOCKET_MAX:
            raise SandboxError(
                f"docker_slot_dir={str(config.slot_dir)!r}: socket path {self.socket_path!r} is "
                f"longer than {_SOCKET_MAX} bytes; choose a shorter docker_slot_dir"
            )
        self.container: str = ""
        self.volume: str = ""
        self.inner: docker.APIClient | None = None
        self.lab_image_id = ""
        self.oom_baseline: dict[str, int] = {}

    @property
    def labels(self) -> dict[str, str]:
        return orbital_labels(self.config.prefix, self.config.worker_id, self.index)

    def client(self) -> docker.APIClient:
        """The inner daemon's client.

        Raises:
            SandboxError: if the slot was not built.
        """
        if self.inner is None:
            raise SandboxError(f"slot {self.base_name}: not built")
        return self.inner

    # --- build and destroy -------------------------------------------------------------

    def build(self) -> None:
        """Create the outer container, wait for its daemon, load the lab image.

        Raises:
            SandboxError: naming the step that failed; the half-built slot is removed.
        """
        started = time.monotonic()
        suffix = secrets.token_hex(3)
        self.container = f"{self.base_name}-{suffix}"
        self.volume = f"{self.base_name}-{suffix}-docker"
        try:
            self._create_outer()
            self.inner = self._wait_inner()
            self.load_lab_image()
            self.oom_baseline = self.oom_kills()
        except DOCKER_ERRORS as err:
            self.destroy()
            raise SandboxError(f"slot {self.base_name}: warm-up failed: {err}") from err
        except BaseException:
            self.destroy()
            raise
        logger.info(
            "slot %s: warm in %.1f s (container %s, port %s:%d, %s)",
            self.base_name,
            time.monotonic() - started,
            self.container,
            self.config.bind_address,
            self.port,
            self.config.isolation,
        )

    def _create_outer(self) -> None:
        cfg = self.config
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        binds: dict[str, dict[str, str]] = {
            self.volume: {"bind": "/var/lib/docker", "mode": "rw"},
            str(self.socket_dir): {"bind": _SOCKET_DIR, "mode": "rw"},
        }
        for source, _target in cfg.lab_mounts:
            binds[source] = {"bind": source, "mode": "ro"}
        extra: dict[str, Any] = {}
        if cfg.isolation == "sysbox":
            extra["runtime"] = cfg.runtime
        else:
            extra["cap_add"] = ["SYS_ADMIN", "NET_ADMIN"]
            extra["security_opt"] = ["seccomp=unconfined", "apparmor=unconfined"]
            extra["cgroupns"] = "private"
        host_config = self.host.create_host_config(
            binds=binds,
            port_bindings={self.port: (cfg.bind_address, self.port)},
            mem_limit=cfg.memory,
            memswap_limit=cfg.memory,
            nano_cpus=int(cfg.cpus * 1e9) or None,
            pids_limit=cfg.pids_limit,
            init=True,
            **extra,
        )
        try:
            self.host.create_volume(self.volume, labels=self.labels)
            self.host.create_container(
                cfg.outer_image,
                name=self.container,
                hostname=f"slot{self.index}",
                entrypoint=["/bin/sh", "-c", BOOT_SCRIPT, "orbital-boot"],
                command=[],
                environment={
                    "ORBITAL_REMOUNT": "1" if cfg.isolation == "nested-docker" else "0",
                    "DOCKER_TLS_CERTDIR": "",
                },
                labels=self.labels,
                ports=[self.port],
                host_config=host_config,
            )
            self.host.start(self.container)
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"slot {self.base_name}: cannot start outer container from "
                f"{cfg.outer_image!r}: {err}"
            ) from err

    def _wait_inner(self) -> docker.APIClient:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while True:
            try:
                # Without a version the client asks the daemon for it: a ping that also
                # settles the API version for every later call.
                return docker.APIClient(
                    base_url=f"unix://{self.socket_path}", timeout=int(self.config.api_timeout_s)
                )
            except DOCKER_ERRORS:
                pass
            state = self.host.inspect_container(self.container)["State"]
            if not state.get("Running"):
                tail = self.host.logs(self.container, tail=15).decode(errors="replace")
                raise SandboxError(
                    f"slot {self.base_name}: outer container exited with {state.get('ExitCode')} "
                    f"before its daemon was ready; last log lines:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"slot {self.base_name}: inner daemon did not answer on {self.socket_path} "
                    f"within {self.config.ready_timeout_s:g} s (docker_ready_timeout_s)"
                )
            time.sleep(0.2)

    def destroy(self) -> bool:
        """Remove the outer container, its volume and socket directory.

        Gives up after ``kill_attempts`` refused removals. Returns True when gone.
        """
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.close()
        removed = remove_container(self.host, self.container, self.config.kill_attempts)
        if removed and self.volume:
            try:
                self.host.remove_volume(self.volume, force=True)
            except docker.errors.NotFound:
                pass
            except DOCKER_ERRORS as err:
                # Removing a big inner data-root can outlast the API timeout; the volume
                # is labelled, so the next start of this worker removes it.
                logger.warning(
                    "slot %s: volume %s not removed (%s); it goes at the next start",
                    self.base_name,
                    self.volume,
                    err,
                )
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        return removed

    # --- the lab image -----------------------------------------------------------------

    def host_lab_image_id(self) -> str:
        """The lab image's id on the host engine.

        Raises:
            SandboxError: if the host does not have the lab image.
        """
        try:
            return str(self.host.inspect_image(self.config.lab_image)["Id"])
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"docker_lab_image={self.config.lab_image!r}: not on the host engine "
                f"(pull or build it there first): {err}"
            ) from err

    def load_lab_image(self) -> None:
        """Stream the lab image from the host engine into the inner daemon.

        Raises:
            SandboxError: if the host lacks the image or the inner daemon refuses it.
        """
        image_id = self.host_lab_image_id()
        started = time.monotonic()
        loader = docker.APIClient(
            base_url=f"unix://{self.socket_path}",
            version=self.client().api_version,
            timeout=_LOAD_TIMEOUT_S,
        )
        try:
            chunks = self.host.get_image(self.config.lab_image, chunk_size=1 << 20)
            for message in loader.load_image(chunks, quiet=True) or ():
                if isinstance(message, dict) and message.get("error"):
                    raise SandboxError(
                        f"slot {self.base_name}: loading the lab image: {message['error']}"
                    )
            loaded = str(loader.inspect_image(self.config.lab_image)["Id"])
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"slot {self.base_name}: loading {self.config.lab_image!r}: {err}"
            ) from err
        finally:
            loader.close()
        if loaded != image_id:
            raise SandboxError(
                f"slot {self.base_name}: loaded {self.config.lab_image!r} as {loaded}, "
                f"but the host has {image_id}"
            )
        self.lab_image_id = image_id
        logger.info(
            "slot %s: lab image %s (%s) loaded in %.1f s",
            self.base_name,
            self.config.lab_image,
            image_id[7:19],
            time.monotonic() - started,
        )

    # --- health, limits ----------------------------------------------------------------

    def healthy(self) -> bool:
        """True when the outer container runs and its inner daemon answers."""
        if self.inner is None:
            return False
        try:
            running = bool(self.host.inspect_container(self.container)["State"].get("Running"))
            return running and bool(self.inner.ping())
        except DOCKER_ERRORS:
            return False

    def oom_kills(self) -> dict[str, int]:
        """OOM kills so far in each memory cgroup of the slot (path -> count).

        cgroup v1 counts a kill only in the victim's own group, so every group is
        read; compare with :meth:`oom_since` rather than summing, since groups vanish
        with their containers.
        """
        script = (
            "find /sys/fs/cgroup \\( -name memory.events -o -name memory.oom_control \\)"
            " -exec awk '$1 == \"oom_kill\" {print FILENAME, $2}' {} +"
        )
        counts: dict[str, int] = {}
        for line in self.outer_exec(["sh", "-c", script]).splitlines():
            path, _, value = line.rpartition(" ")
            if value.isdigit():
                counts[path] = int(value)
        return counts

    def oom_since(self, baseline: Mapping[str, int]) -> tuple[bool, dict[str, int]]:
        """Whether any group counted a new OOM kill since ``baseline``; and the new counts."""
        now = self.oom_kills()
        return any(n > baseline.get(path, 0) for path, n in now.items()), now

    def outer_exec(self, argv: list[str], *, detach: bool = False) -> str:
        """Run a short command in the outer container and return its output; with
        ``detach``, start it in the background and return at once.

        Raises:
            SandboxError: if it cannot run or exits non-zero.
        """
        try:
            created = self.host.exec_create(self.container, argv)
            output = self.host.exec_start(created["Id"], detach=detach)
            if detach:
                return ""
            code = self.host.exec_inspect(created["Id"]).get("ExitCode")
        except DOCKER_ERRORS as err:
            raise SandboxError(f"slot {self.base_name}: {argv[0]} failed: {err}") from err
        text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        if code != 0:
            raise SandboxError(
                f"slot {self.base_name}: {' '.join(argv[:2])} exited {code}: {text[-500:]}"
            )
        return text

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write one file into the outer container's file system (parents are created)."""
        try:
            self.host.put_archive(self.container, "/", file_archive(path, data, mode))
        except DOCKER_ERRORS as err:
            raise SandboxError(f"slot {self.base_name}: cannot write {path}: {err}") from err

    # --- between jobs ------------------------------------------------------------------

    def clean(self) -> None:
        """Remove every inner container, volume, network and image except the lab image,
        and the workspace; then check that nothing is left.

        Raises:
            SandboxError: naming what could not be removed.
        """
        inner = self.client()
        try:
            for container in inner.containers(all=True):
                remove_container(inner, container["Id"], self.config.kill_attempts, volumes=True)
            for volume in inner.volumes().get("Volumes") or []:
                inner.remove_volume(volume["Name"], force=True)
            for network in inner.networks():
                if network["Name"] not in _DEFAULT_NETWORKS:
                    inner.remove_network(network["Id"])
            for image in inner.images(all=True):
                if image["Id"] != self.lab_image_id:
                    inner.remove_image(image["Id"], force=True, noprune=False)
        except docker.errors.NotFound:
            pass
        except DOCKER_ERRORS as err:
            raise SandboxError(f"slot {self.base_name}: cleaning the inner daemon: {err}") from err
        self.outer_exec(["find", WORKSPACES, "-mindepth", "1", "-delete"])
        self.verify_empty()

    def refresh_lab_image(self) -> bool:
        """Load the lab image again if it changed on the host; True when it did.

        Raises:
            SandboxError: if the new image cannot be loaded.
        """
        old = self.lab_image_id
        if self.host_lab_image_id() == old:
            return False
        self.load_lab_image()
        try:
            self.client().remove_image(old, force=True)
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"slot {self.base_name}: old lab image {old[7:19]} not removed: {err}"
            ) from err
        logger.info(
            "slot %s: lab image changed on the host; now %s",
            self.base_name,
            self.lab_image_id[7:19],
        )
        return True

    def verify_empty(self) -> None:
        """Check the slot holds nothing of a previous job.

        Raises:
            SandboxError: listing what is left.
        """
        inner = self.client()
        left: list[str] = []
        try:
            left += [f"container {c['Names'][0]}" for c in inner.containers(all=True)]
            left += [f"volume {v['Name']}" for v in inner.volumes().get("Volumes") or []]
            left += [
                f"network {n['Name']}"
                for n in inner.networks()
                if n["Name"] not in _DEFAULT_NETWORKS
            ]
            left += [
                f"image {i['Id'][7:19]}"
                for i in inner.images(all=True)
                if i["Id"] != self.lab_image_id
            ]
        except DOCKER_ERRORS as err:
            raise SandboxError(
                f"slot {self.base_name}: cannot list the inner daemon: {err}"
            ) from err
        files = self.outer_exec(["find", WORKSPACES, "-mindepth", "1", "-maxdepth", "1"]).split()
        left += [f"file {f}" for f in files]
        if left:
            raise SandboxError(
                f"slot {self.base_name}: not clean after reset: {', '.join(left[:10])}"
            )
