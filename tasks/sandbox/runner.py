"""Running a command of a job in its sandbox, streaming its output, and leaving nothing behind.

Two confinements, chosen by `JOB_SANDBOX` (see `confinement`):
- **bwrap** (bubblewrap): PID, network, IPC and UTS namespaces of its own; only /usr, a few files of
  /etc and the toolchain, read-only; the work directory is the only writable place (at /job, with
  /tmp inside it); a scrubbed environment; the job's own uid, no capabilities.
- **rlimit**, only when asked for by name: the command in a new session with the same environment
  and limits, as the job's own uid when the worker is root, but sharing the worker's file system
  and network (unconfined, and said so on the job's first log line).

Both: argv lists, never a shell; the job's memory, processes and disk capped for the job as a whole
where the host allows (cgroups, a file system per work directory), per process where it does not;
whatever way the command ends (exit, timeout, cancel, a limit), every process it started is killed.
"""

import contextlib
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from django.conf import settings

from tasks.context import PermanentError
from tasks.sandbox import processes
from tasks.sandbox.workspace import INNER_ROOT, JOB_USER, Workspace

# Files of /etc a command may need (name lookups, dynamic linking); passwd and group are the job's own.
ETC_FILES = ("nsswitch.conf", "ld.so.cache", "localtime", "alternatives")
LIMIT_CHECK_INTERVAL = 0.2  # seconds between looks at the job's cgroup and disk while it runs


class CommandTimedOut(Exception):
    pass


class LimitExceeded(PermanentError):
    """The job ran into one of its limits (memory, processes, disk, files); the message names it."""


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


def command_env(workspace: Workspace, extra: dict[str, str]) -> dict[str, str]:
    """The whole environment of a job's command: nothing is inherited from the worker."""
    env = {
        "PATH": search_path(),
        "HOME": workspace.inner(workspace.root / "home"),
        "TMPDIR": workspace.inner(workspace.root / "tmp"),  # within the work directory (and its disk)
        "USER": JOB_USER,
        "LOGNAME": JOB_USER,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",  # output arrives line by line, not when a buffer fills
        "PYTHONDONTWRITEBYTECODE": "1",
        "CI": "true",
        **extra,
    }
    if workspace.marker:  # last: the job's own `env` cannot replace it
        env[processes.MARKER_VAR] = workspace.marker
    return env


def drop_privileges(workspace: Workspace) -> list[str]:
    """A prefix that runs the command as the job's uid, with no capabilities and no way to regain any."""
    if workspace.uid == os.geteuid():
        return []
    uid = str(workspace.uid)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip


Bind = str | tuple[str, str]  # a path shown read-only at the same place, or (source, place inside)


def bwrap_argv(workspace: Workspace, env: dict[str, str], argv: list[str], ro_binds: Sequence[Bind] = ()) -> list[str]:
    # /tmp first: a mount made after the toolchain's would hide a toolchain that lives under /tmp.
    tmp = str(workspace.root / "tmp")
    wrapped = ["bwrap", "--proc", "/proc", "--dev", "/dev", "--bind", tmp, "/tmp", "--ro-bind", "/usr", "/usr"]  # noqa: S108
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            wrapped += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            wrapped += ["--ro-bind", str(path), str(path)]
    wrapped += ["--perms", "0755", "--dir", "/etc"]  # else bwrap makes it 0700: the job could not read in it
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            wrapped += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for name in ("passwd", "group"):
        wrapped += ["--ro-bind", str(workspace.root / name), f"/etc/{name}"]
    for bind in [*toolchain_paths(), *ro_binds]:
        source, place = (bind, bind) if isinstance(bind, str) else bind
        # Parents that bwrap would create are root-only (0700); the job's user must pass them.
        for parent in reversed(Path(place).parents[:-1]):
            wrapped += ["--perms", "0755", "--dir", str(parent)]
        wrapped += ["--ro-bind", source, place]
    wrapped += [
        "--bind", str(workspace.root), str(INNER_ROOT), "--chdir", workspace.inner(workspace.src),
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
    ]  # fmt: skip
    for name, value in env.items():
        wrapped += ["--setenv", name, value]
    if os.geteuid() == 0:
        # bwrap needs root to set up the mounts; the command then runs as the job's uid.
        wrapped += ["--", *drop_privileges(workspace)]
    else:
        wrapped += ["--unshare-user", "--cap-drop", "ALL", "--"]
    return wrapped + argv


def _limits(workspace: Workspace, cpu_seconds: int) -> Callable[[], None]:
    """Per-process limits: CPU time always; memory per process where no cgroup caps the job's total; a
    file may not outgrow the job's disk; the process count counts per uid (the job's own, as root)."""
    limits = workspace.limits
    cgroup = workspace.slot and workspace.slot.cgroup
    memory = None if cgroup else limits.memory_bytes
    # With a cgroup, its pids.max is the limit that counts (and is seen when hit): the per-uid one is
    # set beyond it, as a second fence.
    file_bytes, nproc = limits.disk_bytes, limits.max_processes + (64 if cgroup else 0)

    def apply() -> None:  # runs in the child between fork and exec: only setrlimit calls
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


class Output:
    """Where a command's output goes (its bytes as they arrive, and a tick while it is quiet)."""

    def write(self, data: bytes) -> None: ...

    def tick(self) -> None: ...


def confined_argv(
    argv: list[str], workspace: Workspace, env: dict[str, str], ro_binds: Sequence[Bind] = ()
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `argv` confined in `workspace`."""
    if workspace.sandbox == "bwrap":
        full_argv, popen_env = bwrap_argv(workspace, env, argv, ro_binds), {}
    else:
        full_argv, popen_env = [*drop_privileges(workspace), *argv], env
    if workspace.slot and workspace.slot.cgroup:
        full_argv = workspace.slot.cgroup.enter_argv() + full_argv
    return full_argv, popen_env


def run_command(
    argv: list[str],
    workspace: Workspace,
    output: Output,
    *,
    env: dict[str, str] | None = None,
    cpu_seconds: int = 3600,
    timeout: float | None = None,
    ro_binds: Sequence[Bind] = (),
) -> int:
    """Run a job's command confined in `workspace`; stream its output; return its exit code.

    Raises LimitExceeded as soon as the job runs into a limit, CommandTimedOut after `timeout`
    seconds (the Celery soft time limit, or a cancel, arrive as exceptions from outside instead).
    Whichever way it ends, nothing it started is left running.
    """
    if shutil.which(argv[0], path=search_path()) is None:
        raise PermanentError(f"{argv[0]!r} is not installed on this worker (looked in {search_path()})")
    if workspace.marker:
        processes.reap_orphans()
    full_argv, popen_env = confined_argv(argv, workspace, command_env(workspace, env or {}), ro_binds)
    code = run_process(
        full_argv,
        output,
        cwd=workspace.src,
        env=popen_env,
        preexec_fn=_limits(workspace, cpu_seconds),
        timeout=timeout,
        watch=workspace.limit_hit,
        kill=workspace.kill_processes,
    )
    if problem := workspace.limit_hit():  # a limit that ended the command just as it exited
        raise LimitExceeded(problem)
    return code


def run_process(
    argv: list[str],
    output: Output,
    *,
    cwd: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None = None,
    timeout: float | None = None,
    watch: Callable[[], str | None] | None = None,
    kill: Callable[[], None] | None = None,
) -> int:
    """Start `argv` in a new session, stream its output (stdout and stderr merged, in order) to
    `output`, and kill what is left of it (its process group, then `kill`) when it ends, times out,
    runs into a limit (`watch` returns what was hit) or is interrupted."""
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
    next_watch = time.monotonic() + LIMIT_CHECK_INTERVAL
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
            now = time.monotonic()
            if deadline and now > deadline:
                raise CommandTimedOut(f"timed out after {timeout}s")
            if watch and now >= next_watch:
                next_watch = now + LIMIT_CHECK_INTERVAL
                if problem := watch():
                    raise LimitExceeded(problem)
        return proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if kill:
            kill()
        proc.wait()
        proc.stdout.close()
