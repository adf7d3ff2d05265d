"""A job's work directory: its own file system, slot, uid and cgroup, made fresh and removed after.

Layout (the directory is mounted at /job inside bwrap)::

    <work root>/conveyor-job-XXXX/       root-owned, 0711: the job cannot rename or replace what is here
        src/  out/  home/  tmp/          the job's (its uid, 0700); /tmp inside bwrap is tmp/
        passwd  group                    the sandbox's /etc/passwd and /etc/group, naming the job's uid
    <work root>/conveyor-job-XXXX.img    the ext4 image mounted on it (when the disk is an image)
"""

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.context import PermanentError, RetryableError
from tasks.interrupts import uninterrupted
from tasks.sandbox import processes
from tasks.sandbox.confinement import (
    Capabilities,
    DiskUnavailable,
    Limits,
    Slot,
    SlotsBusy,
    capabilities,
    human_bytes,
    make_disk,
    remove_disk,
    work_root,
)

INNER_ROOT = Path("/job")  # where the work directory appears inside bwrap
JOB_USER = "job"
# The job's disk counts as full below this much free space (a write of a whole buffer fails before
# the last block is taken): 1% of it, and at least 1 MiB.
DISK_FULL_SHARE, DISK_FULL_BYTES = 0.01, 1024 * 1024


def _write_public(path: Path, text: str) -> None:
    """A file the job may read but not change (owned by the worker, 0644 whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o644)
        f.write(text)


class SandboxUnavailable(PermanentError):
    """No sandbox on this worker (and the unconfined mode was not asked for)."""


@dataclass
class Workspace:
    root: Path
    sandbox: str
    caps: Capabilities
    slot: Slot | None = None
    marker: str | None = None  # only where neither a cgroup nor a uid finds the job's processes
    limits: Limits = field(default_factory=Limits)
    _next_process_count: float = 0.0

    @classmethod
    def create(cls, sandbox: str | None = None) -> "Workspace":
        """A fresh work directory with the confinement this worker has (`sandbox` overrides its mode)."""
        caps = capabilities()
        sandbox = sandbox or caps.sandbox
        if sandbox is None:
            raise SandboxUnavailable(f"no sandbox on this worker: {caps.problem}")
        root = Path(tempfile.mkdtemp(prefix="conveyor-job-", dir=work_root()))
        workspace = cls(root, sandbox, caps)
        try:
            try:
                workspace.slot = Slot.acquire(caps, root)
            except SlotsBusy as exc:
                raise RetryableError(str(exc)) from None
            if caps.disk:
                limits = workspace.limits
                try:
                    make_disk(caps.disk, root, root.with_suffix(".img"), limits.disk_bytes, limits.max_files)
                except DiskUnavailable as exc:
                    raise RetryableError(str(exc)) from None
            os.chmod(root, 0o711)  # noqa: S103 (the job passes through to its dirs)
            uid = workspace.uid
            for name in ("src", "out", "home", "tmp"):
                os.mkdir(root / name, 0o700)
                os.chown(root / name, uid, uid)
            _write_public(
                root / "passwd",
                f"root:x:0:0:root:/root:/usr/sbin/nologin\n{JOB_USER}:x:{uid}:{uid}:Conveyor job:{INNER_ROOT}/home:"
                "/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            )
            _write_public(root / "group", f"root:x:0:\n{JOB_USER}:x:{uid}:\nnogroup:x:65534:\n")
            if workspace.slot.cgroup:
                workspace.slot.cgroup.prepare(workspace.limits.memory_bytes, workspace.limits.max_processes)
            if workspace.slot.uid is None and workspace.slot.cgroup is None and sandbox == "rlimit":
                workspace.marker = processes.new_marker()
        except BaseException:
            workspace.remove()
            raise
        return workspace

    @property
    def uid(self) -> int:
        """The uid the job's processes run as."""
        return self.slot.uid if self.slot and self.slot.uid is not None else os.getuid()

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
        """Give the source tree the platform wrote to the job's uid (links are not followed)."""
        uid = self.uid
        if uid == os.geteuid():
            return
        for _, dirs, files, dir_fd in os.fwalk(self.src, follow_symlinks=False):
            for name in dirs + files:
                os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)

    def limit_hit(self) -> str | None:
        """What limit the job has run into, in words naming its setting; None while within them."""
        limits = self.limits
        hit = self.slot.cgroup.limit_hit() if self.slot and self.slot.cgroup else None
        if hit == "memory":
            return (
                f"memory limit reached: the job used more than {human_bytes(limits.memory_bytes)} "
                "(JOB_MEMORY_BYTES) and a process of it was killed"
            )
        if hit is None and self.slot and self.slot.uid is not None and not self.slot.cgroup:
            # No cgroup counts for us: count the job's uid (what RLIMIT_NPROC stops at), now and then.
            now = time.monotonic()
            if now >= self._next_process_count:
                self._next_process_count = now + 1.0
                if len(processes.pids_of_uid(self.slot.uid)) >= limits.max_processes:
                    hit = "processes"
        if hit == "processes":
            return (
                f"process limit reached: the job tried to run more than {limits.max_processes} "
                "processes at once (JOB_MAX_PROCESSES)"
            )
        if self.caps.disk:
            try:
                usage = os.statvfs(self.root)
            except OSError:
                return None
            if usage.f_favail == 0:
                return (
                    f"file limit reached: the job's work directory holds {limits.max_files} files and "
                    "directories (JOB_MAX_FILES)"
                )
            if usage.f_bavail * usage.f_frsize < max(DISK_FULL_BYTES, DISK_FULL_SHARE * limits.disk_bytes):
                return (
                    f"disk limit reached: the job's work directory (its /tmp included) is full at "
                    f"{human_bytes(limits.disk_bytes)} (JOB_DISK_BYTES)"
                )
        return None

    def kill_processes(self) -> None:
        """Every process of the job: by its cgroup and uid, or by its marker."""
        if self.slot:
            self.slot.kill_processes()
        if self.marker:
            processes.kill_marker(self.marker)

    def remove(self) -> None:
        """Kill what is left of the job, unmount and delete its disk, release its slot: not to be cut
        in the middle by a cancel (a disk left mounted would be lost for good). If the disk cannot be
        removed now, the slot keeps its record and whoever takes the slot next removes it."""
        with uninterrupted():
            removed = False
            try:
                self.kill_processes()
                remove_disk(self.root, self.root.with_suffix(".img"))
                removed = True
            finally:
                if self.slot:
                    self.slot.release(forget=removed)
