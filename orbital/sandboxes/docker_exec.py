"""Running one command in a lab container through the Docker API, with live output.

The exec API streams a command's output but cannot kill it. Every step therefore
runs under a small bash wrapper that starts the command as its own process group
(``set -m``) and writes the group id to a file inside the container; a cancel or
timeout kills that group from a second exec (:func:`kill_step`).

Output is read over the slot's Unix socket with anyio (no thread per step), so a
step's timeout and cancellation act on the event loop directly, and closing the
connection ends the read whatever the daemon does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import docker
import docker.errors
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from orbital.errors import SandboxError
from orbital.sandboxes.base import OutputCallback
from orbital.sandboxes.docker_engine import DOCKER_ERRORS

__all__ = ["ExecStream", "StepProcess", "kill_all", "kill_step", "start_step"]

logger = logging.getLogger(__name__)

#: Where the wrapper keeps its process-group files, inside the lab container.
STEP_DIR = "/run/orbital-steps"

# bash only turns on job control (a process group per background job) with -m. The
# command gets the original stderr; the wrapper's own stderr goes to /dev/null before the
# job starts, so bash's job notices ("[1]+ Done", printed as soon as a short command
# ends) never reach the step's output. The exec's exit code is the
# command's status, or 128 + the signal that killed it.
_WRAPPER = """f=$1; shift
mkdir -p "${f%/*}" || exit 125
set -m
exec 3>&2 2>/dev/null
"$@" 2>&3 3>&- &
pid=$!
echo "$pid" > "$f"
wait "$pid"
rc=$?
rm -f "$f"
exit "$rc"
"""

# Kill the group named in the file: exit 0 when signalled, 3 when there is no file (not
# started yet, or finished), 4 when the group is already gone.
_KILLER = """[ -s "$1" ] || exit 3
kill -KILL -- "-$(cat "$1")" || exit 4
"""

_HEADER_LIMIT = 65536


@dataclass(frozen=True)
class StepProcess:
    """One started step: the exec to read and the file naming its process group."""

    exec_id: str
    pid_file: str


def wrap_argv(argv: Sequence[str], pid_file: str) -> list[str]:
    """Return the exec argv that runs ``argv`` under the process-group wrapper."""
    return ["bash", "-c", _WRAPPER, "orbital-step", pid_file, *argv]


def start_step(
    client: docker.APIClient,
    container: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
) -> StepProcess:
    """Create the exec for one step (blocking; call it in a worker thread).

    Raises:
        SandboxError: if the daemon refuses the exec (container gone, bad cwd).
    """
    pid_file = f"{STEP_DIR}/{secrets.token_hex(8)}.pgid"
    try:
        created = client.exec_create(
            container,
            wrap_argv(argv, pid_file),
            stdout=True,
            stderr=True,
            environment=dict(env),
            workdir=cwd,
        )
    except DOCKER_ERRORS as err:
        raise SandboxError(
            f"container {container}: cannot create exec for {argv[0]!r}: {err}"
        ) from err
    return StepProcess(exec_id=str(created["Id"]), pid_file=pid_file)


def kill_step(client: docker.APIClient, container: str, step: StepProcess, attempts: int) -> bool:
    """Kill the step's process group from a second exec (blocking; run it in a thread).

    Tries up to ``attempts`` times (the group file may not be written yet). Returns
    True when the group was signalled or the exec has already ended, False when the
    daemon would not let us (the caller then rebuilds the slot).
    """
    for attempt in range(1, attempts + 1):
        try:
            killer = client.exec_create(
                container, ["bash", "-c", _KILLER, "orbital-kill", step.pid_file]
            )
            client.exec_start(killer["Id"])
            code = client.exec_inspect(killer["Id"]).get("ExitCode")
            if code == 0:
                return True
            if not client.exec_inspect(step.exec_id).get("Running", False):
                return True
        except DOCKER_ERRORS as err:
            logger.warning(
                "container %s: killing step exec %s failed (attempt %d of %d): %s",
                container,
                step.exec_id[:12],
                attempt,
                attempts,
                err,
            )
        time.sleep(0.2 * attempt)
    return False


def kill_all(client: docker.APIClient, container: str, attempts: int) -> bool:
    """Kill every process in ``container`` but its PID 1 (blocking; run it in a thread).

    From inside the container's PID namespace ``kill -1`` reaches every process except
    init and the killer itself, including ones that left their step's process group.
    Returns False when the daemon refused ``attempts`` times.
    """
    for _ in range(attempts):
        try:
            killer = client.exec_create(container, ["sh", "-c", "kill -KILL -1; exit 0"])
            client.exec_start(killer["Id"])
            return True
        except DOCKER_ERRORS:
            time.sleep(0.2)
    return False


class ExecStream:
    """The output of a started exec, read from the daemon's Unix socket.

    Use as an async context manager; iterate :meth:`pump` to forward output.
    """

    def __init__(self, socket_path: str, api_version: str, exec_id: str) -> None:
        self.socket_path = socket_path
        self.api_version = api_version
        self.exec_id = exec_id
        self._stream: ByteStream | None = None
        self._reader: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> ExecStream:
        try:
            self._stream = await anyio.connect_unix(self.socket_path)
            await self._stream.send(self._request())
            self._reader = BufferedByteReceiveStream(self._stream)
            await self._read_head()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (ends a read in progress)."""
        if self._stream is not None:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
            self._stream = None

    def _request(self) -> bytes:
        body = json.dumps({"Detach": False, "Tty": False}).encode()
        head = (
            f"POST /v{self.api_version}/exec/{self.exec_id}/start HTTP/1.1\r\n"
            "Host: docker\r\n"
            "Content-Type: application/json\r\n"
            "Connection: Upgrade\r\n"
            "Upgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _read_head(self) -> None:
        assert self._reader is not None
        try:
            head = await self._reader.receive_until(b"\r\n\r\n", _HEADER_LIMIT)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound) as err:
            raise SandboxError(
                f"exec {self.exec_id[:12]}: daemon closed the stream: {err!r}"
            ) from err
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] not in ("101", "200"):
            detail = b""
            with anyio.move_on_after(1.0):
                with contextlib.suppress(
                    anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError
                ):
                    detail = await self._reader.receive(4096)
            raise SandboxError(
                f"exec {self.exec_id[:12]}: daemon answered {status_line!r}: "
                f"{detail.decode(errors='replace').strip()[:300]}"
            )

    async def pump(self, on_output: OutputCallback) -> None:
        """Forward every output frame to ``on_output`` until the exec's output ends."""
        assert self._reader is not None
        while True:
            try:
                header = await self._reader.receive_exactly(8)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
                return
            size = int.from_bytes(header[4:8], "big")
            if size == 0:
                continue
            try:
                payload = await self._reader.receive_exactly(size)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
                return
            await on_output(payload)
