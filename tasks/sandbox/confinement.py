"""What confines a job on this host, found once per worker process, and the per-job resources.

- **The sandbox**: bubblewrap, or the unconfined rlimit mode when the operator names it. With
  `JOB_SANDBOX=auto` and no working bwrap there is none, and tool jobs fail instead of running
  unconfined (`Capabilities.sandbox` is None, `problem` says why).
- **A uid per job**: a worker running as root runs each job as `JOB_UID_BASE + slot`, so that one
  job's processes and files are its own (the process limit counts per uid) and nothing it leaves
  can be mistaken for another's.
- **A cgroup per job** (v2, or v1's memory and pids hierarchies), where the host lets the worker
  make them: memory and process count are capped for the job as a whole, and every process it
  started is found there, whatever it did to its session, environment or parent.
- **A disk per job**: the work directory (the job's /tmp included) is a file system of its own,
  `JOB_DISK_BYTES` and `JOB_MAX_FILES` large: an ext4 image on a loop device, else a sized tmpfs.

A slot (`Slot`) is the unit of all three: held through a lock file for as long as the job runs, so
that at most one job uses a uid or a cgroup at a time, and whatever a killed worker left in a slot
(processes, a mounted disk) is cleared by the next job that takes it.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from django.conf import settings

from tasks.interrupts import uninterrupted
from tasks.sandbox import processes

log = logging.getLogger(__name__)

UNCONFINED_NOTE = "UNCONFINED: the command shares the worker's file system and network"


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- cgroups -------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, super options) of each mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            found.append((fields[4].replace("\\040", " "), fields[dash + 1], set(fields[dash + 3].split(","))))
    return found


@dataclass(frozen=True)
class CgroupLayout:
    """Where job cgroups are made: one parent directory per hierarchy (v2: one; v1: memory, pids)."""

    version: int
    memory: Path  # the parent under which each slot's group is made (v2: the same for both)
    pids: Path

    def describe(self) -> str:
        return f"cgroup v{self.version}"

    def for_slot(self, number: int) -> "JobCgroup":
        name = f"slot-{number}"
        return JobCgroup(self.version, self.memory / name, self.pids / name)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _find_cgroups() -> CgroupLayout | None:
    if os.geteuid() != 0:
        return None  # making cgroups needs a delegated hierarchy; an unprivileged worker has none here
    mounts = _mounts()
    try:
        v2 = next((Path(point) for point, fstype, _ in mounts if fstype == "cgroup2"), None)
        if settings.JOB_CGROUP_ROOT or (
            v2 and {"memory", "pids"} <= set((v2 / "cgroup.controllers").read_text().split())
        ):
            parent = Path(settings.JOB_CGROUP_ROOT) if settings.JOB_CGROUP_ROOT else v2 / "conveyor"
            parent.mkdir(exist_ok=True)
            # Controllers must be enabled for the children of each level (the root's own processes
            # do not count against the "no internal processes" rule; a delegated group must be empty).
            if not settings.JOB_CGROUP_ROOT:
                _write(v2 / "cgroup.subtree_control", "+memory +pids")
            _write(parent / "cgroup.subtree_control", "+memory +pids")
            return CgroupLayout(2, parent, parent)
        memory = next((Path(p) for p, fstype, opts in mounts if fstype == "cgroup" and "memory" in opts), None)
        pids = next((Path(p) for p, fstype, opts in mounts if fstype == "cgroup" and "pids" in opts), None)
        if memory and pids:
            (memory / "conveyor").mkdir(exist_ok=True)
            (pids / "conveyor").mkdir(exist_ok=True)
            return CgroupLayout(1, memory / "conveyor", pids / "conveyor")
    except OSError as exc:
        log.warning("job cgroups unavailable (%s); memory and processes are limited per process only", exc)
    return None


@dataclass(frozen=True)
class JobCgroup:
    """One slot's cgroup (v2), or its pair of groups in v1's memory and pids hierarchies."""

    version: int
    memory: Path
    pids: Path

    @property
    def groups(self) -> list[Path]:
        return [self.memory] if self.version == 2 else [self.memory, self.pids]

    def prepare(self, memory_bytes: int, max_processes: int) -> None:
        """A fresh group (zeroed counters) with the job's limits; anything left in it is killed first."""
        self.remove()
        for group in self.groups:
            group.mkdir()
        if self.version == 2:
            _write(self.memory / "memory.max", str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                _write(self.memory / "memory.swap.max", "0")
            _write(self.pids / "pids.max", str(max_processes))
        else:
            _write(self.memory / "memory.limit_in_bytes", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(self.memory / "memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(self.pids / "pids.max", str(max_processes))

    def enter_argv(self) -> list[str]:
        """A prefix for a command's argv that moves it into the group before it execs (so that it and
        everything it starts is counted from its first instruction)."""
        # `sh -c SCRIPT sh FILE... -- ARGV...`: write the shell's own pid into each FILE, then exec ARGV.
        script = 'for f in "$@"; do shift; [ "$f" = -- ] && break; echo "$$" > "$f" || exit 125; done; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *(str(group / "cgroup.procs") for group in self.groups), "--"]

    def pids_in(self) -> list[int]:
        found = []
        for group in self.groups:
            try:
                found += [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
            except OSError:
                continue
        return found

    def limit_hit(self) -> str | None:
        """ "memory" or "processes" once the job has run into that limit."""
        events = self.memory / ("memory.events" if self.version == 2 else "memory.oom_control")
        if _counter(events, "oom_kill"):
            return "memory"
        if _counter(self.pids / "pids.events", "max"):
            return "processes"
        return None

    def kill(self) -> None:
        kill_file = self.memory / "cgroup.kill"
        if self.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        processes.kill_all(self.pids_in)

    def remove(self) -> None:
        for group in self.groups:
            if not group.exists():
                continue
            self.kill()
            for _ in range(100):  # the kernel empties a group a moment after its last process died
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _counter(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


# --- disks -----------------------------------------------------------------------------------------


class DiskUnavailable(OSError):
    """The host has no room for a job's disk now (a passing condition)."""


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()[-300:]}")


def make_disk(kind: str, root: Path, image: Path, size: int, inodes: int) -> None:
    """Mount a file system of `size` bytes and `inodes` files on `root` (an empty directory)."""
    if kind == "ext4":
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # Reserved on the host now: a sparse image would let jobs together overcommit the host's
            # disk, and one job's writes fail (or corrupt another's file system) when it fills.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskUnavailable(
                    f"no room on this worker host for the job's disk of {human_bytes(size)} (JOB_DISK_BYTES)"
                ) from None
            raise
        finally:
            os.close(fd)
        # A scratch file system for one job: no journal, no room to grow, no checksums (half the
        # time of mkfs's defaults: 16 against 32 ms here).
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), "-G", "32",
              "-O", "^has_journal,^resize_inode,^metadata_csum",
              "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0", str(image)])  # fmt: skip
        _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(root)])
    elif kind == "tmpfs":
        _run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0711,nosuid,nodev", "tmpfs",
              str(root)])  # fmt: skip
    os.chmod(root, 0o711)  # noqa: S103 (traversable, not listable: the job reaches its own dirs)


def is_mount(path: Path) -> bool:
    target = str(path)
    return any(point == target for point, _, _ in _mounts())


def remove_disk(root: Path, image: Path) -> None:
    """Unmount and delete a work directory's file system (and whatever is in a plain directory)."""
    if is_mount(root):
        try:
            _run(["umount", str(root)])
        except OSError:
            _run(["umount", "-l", str(root)])  # still busy: detach it now, the kernel frees it when idle
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    shutil.rmtree(root, ignore_errors=True)


def _find_disk(work_root: Path) -> str:
    """ "ext4" or "tmpfs" if this worker can mount a sized file system for each job; "" if not."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return ""
    for kind in ("ext4", "tmpfs"):
        if kind == "ext4" and not (shutil.which("mkfs.ext4") and os.path.exists("/dev/loop-control")):
            continue
        root = Path(tempfile.mkdtemp(prefix="conveyor-probe-", dir=work_root))
        image = root.with_suffix(".img")
        with uninterrupted():
            try:
                make_disk(kind, root, image, 16 * 1024**2, 1000)
                return kind
            except OSError as exc:
                log.info("work directories cannot be %s file systems here: %s", kind, exc)
            finally:
                remove_disk(root, image)
    return ""


@dataclass(frozen=True)
class Limits:
    """A job's limits, as the settings had them when its work directory was made."""

    memory_bytes: int = field(default_factory=lambda: settings.JOB_MEMORY_BYTES)
    max_processes: int = field(default_factory=lambda: settings.JOB_MAX_PROCESSES)
    disk_bytes: int = field(default_factory=lambda: settings.JOB_DISK_BYTES)
    max_files: int = field(default_factory=lambda: settings.JOB_MAX_FILES)


# --- what this host offers -------------------------------------------------------------------------


def work_root() -> Path:
    """The worker's own directory for work directories: made by it, owned by it, never a link."""
    base = Path(settings.JOB_WORK_ROOT or tempfile.gettempdir())
    path = base / f"conveyor-jobs-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o711, parents=False)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not a directory of this worker's own (a link, or writable by others)")
    return path


def _bwrap_problem() -> str:
    if not shutil.which("bwrap"):
        return "bwrap (bubblewrap) is not installed on this worker"
    argv = ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        argv.append("--unshare-user")
    try:
        done = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap does not work on this worker: {exc}"
    if done.returncode != 0:
        return f"bwrap does not work on this worker: {done.stderr.strip()[-300:] or done.returncode}"
    return ""


@dataclass(frozen=True)
class Capabilities:
    sandbox: str | None  # "bwrap", "rlimit" (unconfined, asked for by name), or None: tool jobs cannot run
    problem: str  # why there is no sandbox, or why it is weaker than it should be
    own_uid: bool  # each job runs as a uid of its own
    cgroups: CgroupLayout | None
    disk: str  # "ext4", "tmpfs" or "" (the work directory is not capped)

    def describe(self, limits: Limits | None = None) -> str:
        """One line for logs: the sandbox and how each per-job limit is enforced."""
        if self.sandbox is None:
            return f"none ({self.problem}): build, test and lint jobs fail here"
        limits = limits or Limits()
        memory, procs = human_bytes(limits.memory_bytes), limits.max_processes
        parts = [
            f"uid per job from {settings.JOB_UID_BASE}" if self.own_uid else "the worker's uid",
            f"memory {memory} and {procs} processes per job ({self.cgroups.describe()})"
            if self.cgroups
            else f"memory {memory} per process, {procs} processes per {'job' if self.own_uid else 'uid'} (rlimit)",
            f"disk {human_bytes(limits.disk_bytes)} and {limits.max_files} files per job ({self.disk})"
            if self.disk
            else "disk not capped",
        ]
        head = self.sandbox if self.sandbox == "bwrap" else f"{self.sandbox} ({UNCONFINED_NOTE})"
        return f"{head}; {', '.join(parts)}"


def _accounts_in(base: int, count: int) -> str:
    taken = []
    for uid in range(base, base + count):
        with contextlib.suppress(KeyError):
            taken.append(f"{uid}: {pwd.getpwuid(uid).pw_name}")
    return ", ".join(taken[:3])


@cache
def capabilities() -> Capabilities:
    """Found once per process: probing bwrap, cgroups and mounts costs tens of milliseconds."""
    problem = ""
    if settings.JOB_SANDBOX == "rlimit":
        sandbox: str | None = "rlimit"
    else:
        problem = _bwrap_problem()
        sandbox = None if problem else "bwrap"
        if problem and settings.JOB_SANDBOX == "auto":
            problem += "; tool jobs do not run unconfined unless JOB_SANDBOX=rlimit is set"
    own_uid = os.geteuid() == 0 and bool(shutil.which("setpriv"))
    if own_uid and (taken := _accounts_in(settings.JOB_UID_BASE, settings.JOB_SLOTS)):
        # Their processes would be killed, and their files taken, as a job's.
        sandbox, problem = None, f"JOB_UID_BASE..+JOB_SLOTS overlaps accounts of this host ({taken})"
    try:
        disk = _find_disk(work_root()) if sandbox else ""
    except OSError as exc:
        disk, problem = "", problem or str(exc)
    return Capabilities(sandbox, problem, own_uid, _find_cgroups() if sandbox else None, disk)


# --- slots -----------------------------------------------------------------------------------------


def _own_dir(path: Path, mode: int) -> Path:
    """A directory of the worker's (made with `mode` if missing), refused if it is a link, someone
    else's, or writable by others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not a directory of this worker's own (a link, or writable by others)")
    return path


def _state_dir() -> Path:
    """Where the worker keeps its slots' locks and the git proxies' sockets: /run/conveyor as root
    (one per host, whatever JOB_WORK_ROOT each worker has), else its work root."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return _own_dir(Path("/run/conveyor"), 0o711)
    return work_root()


def _slots_dir() -> Path:
    path = _own_dir(_state_dir() / "slots", 0o700)
    if os.lstat(path).st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory of this worker's")
    return path


def egress_socket(slot: int | None) -> Path:
    """A short path (a Unix socket's may not pass 107 bytes) for the git proxy of a slot's job."""
    folder = _own_dir(_state_dir() / "egress", 0o711)  # the job's user passes through, cannot list
    path = folder / f"{slot if slot is not None else os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket a killed worker left
    return path


class SlotsBusy(Exception):
    """Every slot of this host is taken: more tool jobs at once than JOB_SLOTS."""


@dataclass
class Slot:
    """A numbered place for one running job on this host: its uid, its cgroup, its lock."""

    number: int
    uid: int | None
    cgroup: JobCgroup | None
    _fd: int

    @classmethod
    def acquire(cls, caps: Capabilities, workspace: Path) -> "Slot":
        folder = _slots_dir()
        for number in range(settings.JOB_SLOTS):
            fd = os.open(folder / f"{number}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            slot = cls(
                number,
                settings.JOB_UID_BASE + number if caps.own_uid else None,
                caps.cgroups.for_slot(number) if caps.cgroups else None,
                fd,
            )
            try:
                slot._clear_previous()
                slot._record(workspace)
            except BaseException:
                slot.release()
                raise
            return slot
        raise SlotsBusy(f"all {settings.JOB_SLOTS} job slots of this host are in use (JOB_SLOTS)")

    def _clear_previous(self) -> None:
        """Whatever the slot's last holder left, if it died without cleaning up: its processes, its
        cgroup, its work directory (still mounted), and what its uid keeps beyond its processes."""
        if self.uid is not None:
            processes.kill_uid(self.uid)
        if self.cgroup:
            self.cgroup.remove()
        os.lseek(self._fd, 0, os.SEEK_SET)
        try:
            previous = json.loads(os.read(self._fd, 4096) or b"{}")
        except ValueError:
            previous = {}
        if previous.get("workspace") and os.path.isdir(previous["workspace"]):
            root = Path(previous["workspace"])
            log.warning("slot %d: removing the work directory a lost job left: %s", self.number, root)
            remove_disk(root, root.with_suffix(".img"))
        if self.uid is not None:
            scrub_uid(self.uid)

    def _record(self, workspace: Path) -> None:
        data = json.dumps({"workspace": str(workspace), "pid": os.getpid()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def kill_processes(self) -> None:
        """Every process of the job, wherever it went: its cgroup holds them all (a process cannot
        leave it), else its uid does."""
        if self.cgroup:
            self.cgroup.kill()
        elif self.uid is not None:
            processes.kill_uid(self.uid)

    def release(self, *, forget: bool = True) -> None:
        """Let the slot go. `forget=False` keeps its record (a work directory that could not be
        removed), for the next holder to clear."""
        if self._fd < 0:
            return
        try:
            self.kill_processes()
            if self.cgroup:
                self.cgroup.remove()
            if self.uid is not None:
                scrub_uid(self.uid)
            if forget:
                os.ftruncate(self._fd, 0)
        except OSError:
            log.exception("slot %d: could not be cleared; the next job in it will try again", self.number)
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = -1


def sweep_slots(caps: Capabilities) -> int:
    """Clear every free slot a dead worker left (at a worker's start: otherwise slot N is cleared only
    once N + 1 jobs run at once). Returns how many had something to clear."""
    cleared = 0
    folder = _slots_dir()
    for number in range(settings.JOB_SLOTS):
        path = folder / f"{number}.lock"
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a running job's
        slot = Slot(number, settings.JOB_UID_BASE + number if caps.own_uid else None, None, fd)
        slot.cgroup = caps.cgroups.for_slot(number) if caps.cgroups else None
        cleared += os.fstat(fd).st_size > 0
        with contextlib.suppress(OSError):
            slot._clear_previous()
        slot.release()
    return cleared


# --- what a uid keeps beyond its processes ---------------------------------------------------------

# keyctl(KEYCTL_CLEAR, keyring) for the user and user-session keyrings, as the uid itself (the kernel
# keeps a user's keyrings after its last process exits: the next job with that uid would read them).
_KEYCTL = {"x86_64": 250, "aarch64": 219, "i686": 288, "armv7l": 311}
_CLEAR_KEYRINGS = (
    "import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "for keyring in (-4, -5):\n    libc.syscall(int(sys.argv[1]), 7, keyring)\n"
)


def _uids_with_keys() -> set[int]:
    try:
        with open("/proc/key-users") as f:
            return {int(line.split(":")[0]) for line in f if line.strip()}
    except (OSError, ValueError):
        return set()


def scrub_uid(uid: int) -> None:
    """Remove what a job's uid keeps after its processes are gone: kernel keyrings; System V IPC
    objects, and files in the shared /tmp, /var/tmp and /dev/shm (the rlimit mode shares them; bwrap
    gives each job its own)."""
    if uid in _uids_with_keys() and (number := _KEYCTL.get(os.uname().machine)):
        python = str(settings.JOB_TOOLCHAIN / "bin" / "python")
        subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", python, "-I", "-c",
             _CLEAR_KEYRINGS, str(number)],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
    for kind, column, flag in (("shm", "shmid", "-m"), ("msg", "msqid", "-q"), ("sem", "semid", "-s")):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header = f.readline().split()
                rows = [line.split() for line in f]
            ids = [row[header.index(column)] for row in rows if row[header.index("uid")] == str(uid)]
        except (OSError, ValueError, IndexError):
            continue
        for ipc_id in ids:
            subprocess.run(["ipcrm", flag, ipc_id], capture_output=True, timeout=30, check=False)
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):  # noqa: S108 (cleaning what a job left there)
        try:
            entries = list(os.scandir(shared))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue
