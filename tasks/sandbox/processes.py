"""Finding and killing what a job started, without trusting anything the job wrote.

A job's processes are found by what the job cannot change: its cgroup (see `confinement`), its uid
(a worker running as root gives each job a uid of its own), or, for a worker that can do neither
(the rlimit mode under an unprivileged worker), a marker in their environment. A marker is something
the job could write itself, so one that does not have the platform's exact shape is ignored.
"""

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable

MARKER_VAR = "CONVEYOR_JOB_MARKER"
# "<worker process id>-<32 hex digits>": the worker process that started the job, and the attempt.
MARKER = re.compile(r"(\d{1,10})-([0-9a-f]{32})")
KILL_ROUNDS = 50  # a process may fork while it is being looked for; look again until none is left


def new_marker() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_all(find: Callable[[], Iterable[int]]) -> None:
    """SIGKILL every process `find` names, again and again until it names none."""
    for _ in range(KILL_ROUNDS):
        found = [pid for pid in find() if pid != os.getpid()]
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_of_uid(uid: int) -> list[int]:
    """Processes whose real, effective or saved uid is `uid` (read from /proc, which the job cannot change)."""
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if str(uid).encode() in line.split()[1:4]:
                            found.append(pid)
                        break
        except OSError:
            continue
    return found


def kill_uid(uid: int) -> None:
    kill_all(lambda: pids_of_uid(uid))


def marker_of(pid: int) -> str | None:
    """The job marker in a process's environment, if it has one of the platform's shape."""
    prefix = f"{MARKER_VAR}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read(1 << 20).split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(prefix):
            value = entry[len(prefix) :].decode("ascii", "replace")
            return value if MARKER.fullmatch(value) else None
    return None


def kill_marked(condition: Callable[[str], bool]) -> None:
    kill_all(lambda: [pid for pid in _pids() if (marker := marker_of(pid)) is not None and condition(marker)])


def kill_marker(marker: str) -> None:
    kill_marked(lambda found: found == marker)


def reap_orphans() -> None:
    """Kill what is left of jobs whose worker process died without cleaning up (SIGKILL, OOM): their
    marker names that process, and it is gone. Only a worker that can give jobs neither a cgroup nor
    a uid of their own relies on markers; malformed or foreign markers are left alone."""
    kill_marked(lambda found: not pid_alive(int(MARKER.fullmatch(found).group(1))))
