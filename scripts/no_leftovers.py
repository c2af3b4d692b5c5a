"""Run a command; fail if a process it started is still running once it has returned.

    python3 scripts/no_leftovers.py make demo

This process becomes a child subreaper (Linux ``prctl``), so a process that the command
started and then orphaned (a redis-server or prometheus left behind, a daemon) is
re-parented here instead of to init, and ``pgrep -P <this pid>`` finds exactly those:
never another user's servers on a shared machine. Leftovers are listed, stopped, and the
exit status is 1; otherwise it is the command's own. Standard library only: it runs before
the venv exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 5.0  # a server sent SIGTERM just before the command returned may still be exiting


def reap() -> None:
    """Collect orphans that have exited (they are our zombies now)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children() -> dict[int, str]:
    """pid -> command line of this process's live children, by ``pgrep -P``."""
    reap()
    found = subprocess.run(
        ["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True, check=False
    ).stdout
    result = {}
    for line in found.splitlines():
        pid, _, command = line.partition(" ")
        result[int(pid)] = command
    return result


def leftovers() -> dict[int, str]:
    deadline = time.monotonic() + GRACE_S
    while (left := children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop(pids: dict[int, str]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while children() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in children():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    reap()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"no_leftovers: prctl failed (errno {ctypes.get_errno()})", file=sys.stderr)
        return 2
    started: list[subprocess.Popen] = []
    # Ctrl-C reaches the command (same process group); wait for it to clean up, then check.
    # A handler, set before the command starts: exec resets a handled signal to its default,
    # so the command gets Ctrl-C even where this process was started with SIGINT ignored (a
    # background job); an ignored signal would stay ignored in the command too.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda signum, _frame: [p.send_signal(signum) for p in started])
    command = subprocess.Popen(argv)
    started.append(command)
    status = command.wait()
    left = leftovers()
    if left:
        print(f"left running by `{' '.join(argv)}` (now stopped):", file=sys.stderr)
        for pid, line in sorted(left.items()):
            print(f"  {pid} {line}", file=sys.stderr)
        stop(left)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
