"""Lease watchdog: runs one step and kills it when its worker stops renewing.

Usage: ``python -m orbital.sandboxes.watchdog LEASE_FILE GRACE_S -- ARGV...``

The worker touches ``LEASE_FILE`` each time it renews the job's lease in Redis.
If the file is not touched for ``GRACE_S`` seconds (the worker was paused,
killed, or lost Redis), the watchdog kills the step's whole process group. The
grace is shorter than the Redis lease, so by the time the reaper may hand the
job to another worker, this copy has stopped: a slow or paused worker never
leaves a job running twice at the same time.

The watchdog is the step's process-group leader (the sandbox starts it in a
new session), and exits with the step's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["main"]

_POLL_S = 0.1
EXIT_LEASE_EXPIRED = 124


def _kill_group() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run the step under the watchdog; return its exit status."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: watchdog LEASE_FILE GRACE_S -- ARGV...", file=sys.stderr)
        return 2
    lease_file, grace_s, command = argv[0], float(argv[1]), argv[3:]
    try:
        child = subprocess.Popen(command)
    except OSError as err:
        print(f"cannot start {command[0]!r}: {err.strerror or err}", file=sys.stderr)
        return 127
    # Pass the sandbox's TERM on to the step so it can clean up.
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))

    while True:
        try:
            return child.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            silent_s = time.time() - os.stat(lease_file).st_mtime
        except FileNotFoundError:
            silent_s = float("inf")
        if silent_s > grace_s:
            print(
                f"\n[orbital watchdog] the worker stopped renewing this job's lease "
                f"{silent_s:.1f} s ago; killing the step so it cannot run twice",
                file=sys.stderr,
                flush=True,
            )
            _kill_group()
            return EXIT_LEASE_EXPIRED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
