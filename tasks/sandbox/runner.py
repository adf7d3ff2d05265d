"""Running a job's command in a sandbox, streaming its output, and leaving nothing behind.

Two confinements, chosen by `JOB_SANDBOX`:
- **bwrap** (bubblewrap): a PID, network, IPC and UTS namespace of its own; only /usr, a few files of
  /etc and the toolchain, read-only; the work directory is the only writable place; a scrubbed
  environment. When the worker is root the command runs as `JOB_SANDBOX_USER` (nobody), so that the
  process-count limit applies. Killing bwrap ends its PID namespace and everything in it.
- **rlimit**: the command in a new session and process group, with the same resource limits and
  environment, but sharing the worker's file system and network. Descendants that left the group
  (`setsid`) are found by a marker in their environment and killed; so are those of a job whose
  worker process was killed outright, when the next job starts.

Both: argv lists, never a shell; CPU time, address space, file size and process count limits; on
timeout, cancel or a normal exit, every process the job started is killed.
"""

import contextlib
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from apps.jobs.errors import PermanentError

INNER_ROOT = Path("/job")  # where the work directory appears inside bwrap
ETC_FILES = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "localtime", "alternatives")
MARKER_VAR = "CONVEYOR_JOB_MARKER"


class CommandTimedOut(Exception):
    pass


def mode() -> str:
    if settings.JOB_SANDBOX == "auto":
        return "bwrap" if shutil.which("bwrap") else "rlimit"
    return settings.JOB_SANDBOX


@dataclass
class Workspace:
    """A fresh directory per job: `src` (the tree, the command's cwd), `out` (reports), `home`, `tmp`."""

    root: Path
    sandbox: str = field(default_factory=mode)

    @classmethod
    def create(cls) -> "Workspace":
        root = Path(tempfile.mkdtemp(prefix="conveyor-job-", dir=settings.JOB_WORK_ROOT))
        for name in ("src", "out", "home", "tmp"):
            (root / name).mkdir()
        return cls(root)

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def inner(self, path: Path) -> str:
        """`path` (inside the work directory) as the command sees it."""
        if self.sandbox == "bwrap":
            return str(INNER_ROOT / path.relative_to(self.root))
        return str(path)

    def hand_over(self) -> None:
        """Give the tree to the sandbox user, when the command will run as someone else."""
        if self.sandbox != "bwrap" or os.geteuid() != 0:
            return
        uid = settings.JOB_SANDBOX_USER
        for parent, dirs, files in os.walk(self.root):
            os.chown(parent, uid, uid, follow_symlinks=False)
            for name in dirs + files:
                os.chown(os.path.join(parent, name), uid, uid, follow_symlinks=False)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def toolchain_paths() -> list[str]:
    """The toolchain virtualenv and the Python installation it was made from."""
    venv = settings.JOB_TOOLCHAIN
    if not (venv / "bin" / "python").exists():
        raise FileNotFoundError(f"no job toolchain at {venv} (run `make venv`, or set JOB_TOOLCHAIN)")
    paths = [str(venv)]
    cfg = venv / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                paths.append(str(Path(value.strip()).parent))
    return [p for p in dict.fromkeys(paths) if not p.startswith("/usr/")]


def search_path() -> str:
    """The PATH of job commands: the toolchain, then the system (the same paths inside bwrap)."""
    return f"{settings.JOB_TOOLCHAIN / 'bin'}:/usr/bin:/bin"


def command_env(workspace: Workspace, extra: dict[str, str], marker: str) -> dict[str, str]:
    """The whole environment of a job's command: nothing is inherited from the worker."""
    env = {
        "PATH": search_path(),
        "HOME": workspace.inner(workspace.root / "home"),
        "TMPDIR": workspace.inner(workspace.root / "tmp"),  # on disk, within the work directory
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",  # output arrives line by line, not when a buffer fills
        "PYTHONDONTWRITEBYTECODE": "1",
        "CI": "true",
        **extra,
        MARKER_VAR: marker,
    }
    return env


def bwrap_argv(workspace: Workspace, env: dict[str, str], argv: list[str]) -> list[str]:
    # /tmp first: a mount made after the toolchain's would hide a toolchain that lives under /tmp.
    wrapped = ["bwrap", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]  # noqa: S108
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            wrapped += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            wrapped += ["--ro-bind", str(path), str(path)]
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            wrapped += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for path in toolchain_paths():
        # Parents that bwrap would create are root-only (0700); the sandbox user must pass them.
        for parent in reversed(Path(path).parents[:-1]):
            wrapped += ["--perms", "0755", "--dir", str(parent)]
        wrapped += ["--ro-bind", path, path]
    wrapped += [
        "--bind", str(workspace.root), str(INNER_ROOT), "--chdir", workspace.inner(workspace.src),
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
    ]  # fmt: skip
    for name, value in env.items():
        wrapped += ["--setenv", name, value]
    if os.geteuid() == 0:
        # Drop to an unprivileged user inside (bwrap needs root to set up the mounts), with no
        # capabilities and no way to regain them.
        uid = str(settings.JOB_SANDBOX_USER)
        wrapped += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip
    else:
        wrapped += ["--unshare-user", "--cap-drop", "ALL", "--"]
    return wrapped + argv


def _limits(cpu_seconds: int) -> Callable[[], None]:
    memory, files, processes = settings.JOB_MEMORY_BYTES, settings.JOB_FILE_BYTES, settings.JOB_MAX_PROCESSES

    def apply() -> None:  # runs in the child between fork and exec: only setrlimit calls
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


class Output:
    """Where a command's output goes (its bytes as they arrive, and a tick while it is quiet)."""

    def write(self, data: bytes) -> None: ...

    def tick(self) -> None: ...


def run_command(
    argv: list[str],
    workspace: Workspace,
    output: Output,
    *,
    env: dict[str, str] | None = None,
    cpu_seconds: int = 3600,
    timeout: float | None = None,
) -> int:
    """Run a job's command confined in `workspace`; stream its output; return its exit code.

    Raises CommandTimedOut after `timeout` seconds (the Celery soft time limit, or a cancel, arrive as
    exceptions from outside instead). Whichever way it ends, nothing it started is left running.
    """
    if shutil.which(argv[0], path=search_path()) is None:
        raise PermanentError(f"{argv[0]!r} is not installed on this worker (looked in {search_path()})")
    reap_orphans()
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"  # names this process, so orphans can be told apart
    full_env = command_env(workspace, env or {}, marker)
    if workspace.sandbox == "bwrap":
        full_argv, popen_env = bwrap_argv(workspace, full_env, argv), {}
    else:
        full_argv, popen_env = argv, full_env
    return run_process(
        full_argv,
        output,
        cwd=workspace.src,
        env=popen_env,
        marker=marker,
        preexec_fn=_limits(cpu_seconds),
        timeout=timeout,
    )


def run_process(
    argv: list[str],
    output: Output,
    *,
    cwd: Path,
    env: dict[str, str],
    marker: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Start `argv` in a new session, stream its output (stdout and stderr merged, in order) to
    `output`, and kill what is left of it when it ends, times out or is interrupted."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec_fn,  # only setrlimit calls: safe beside the worker's threads
    )
    deadline = time.monotonic() + timeout if timeout else None
    fd = proc.stdout.fileno()
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    break
                output.write(data)
            elif proc.poll() is not None:
                # The command is done but something it started still holds the pipe open.
                break
            output.tick()
            if deadline and time.monotonic() > deadline:
                raise CommandTimedOut(f"timed out after {timeout}s")
        return proc.wait()
    finally:
        kill_tree(proc, marker)
        proc.stdout.close()


def kill_tree(proc: subprocess.Popen, marker: str | None) -> None:
    """SIGKILL the command's process group (with bwrap, that ends its PID namespace), then any
    process that still carries the job's marker in its environment (it called setsid and forked)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if marker:
        _kill_marked(lambda found: found == marker)


def reap_orphans() -> None:
    """Kill what is left of jobs whose worker process died without cleaning up (SIGKILL, OOM): their
    marker names that process, and it is gone. Only the rlimit mode can leave such orphans; bwrap's
    namespace dies with its parent."""
    _kill_marked(lambda found: not pid_alive(int(found.partition("-")[0] or 0)))


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


def _kill_marked(condition: Callable[[str], bool]) -> None:
    for _ in range(10):  # a survivor may fork while we look; look again until none is left
        found = [pid for pid in _pids() if (marker := _marker(pid)) is not None and condition(marker)]
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _marker(pid: int) -> str | None:
    """The job marker in a process's environment, if it has one."""
    prefix = f"{MARKER_VAR}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    return next((e[len(prefix) :].decode() for e in entries if e.startswith(prefix)), None)
