"""Reading what a job left in its work directory, as an attacker wrote it.

After its command, the platform reads files of the job's tree on the host (artifacts, the JUnit and
ruff reports), as a user the job is not. Whatever the job did to its tree (replaced a directory with
a link to /etc, linked a file to /proc/self/cwd/.env, made a hard link to a file it could not write,
left a fifo), these readers never follow a link, never leave the work directory's file system, and
never read a file that is not a regular file of the job's own: every path is walked one component at
a time from a directory file descriptor with O_NOFOLLOW, and every file is checked with fstat on the
descriptor that is then read. What is refused is named through `note` (the job's log), never read.
"""

import contextlib
import errno
import fnmatch
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a fifo must not hang us
MAX_DEPTH = 128


class Refused(Exception):
    """A path of the job's tree that is not read; the message says why."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def glob_match(path: str, pattern: str) -> bool:
    """`*` within a path segment, `**` across segments."""
    return _match(path.split("/"), pattern.strip("/").split("/"))


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def may_match_below(directory: str, pattern: str) -> bool:
    """Whether `pattern` could match a path inside `directory` (so a link there is worth a note)."""
    parts, pattern_parts = directory.split("/"), pattern.strip("/").split("/")
    for i, part in enumerate(parts):
        if i >= len(pattern_parts):
            return False
        if pattern_parts[i] == "**":
            return True
        if not fnmatch.fnmatchcase(part, pattern_parts[i]):
            return False
    return len(pattern_parts) > len(parts)


class JobTree:
    """The job's work directory, opened once; paths below are relative to it (`src/dist/x.whl`)."""

    def __init__(self, root: Path, note: Callable[[str], None]) -> None:
        self.note = note
        self._fd = os.open(root, DIRECTORY)  # the work directory itself is the platform's, not the job's
        self._dev = os.fstat(self._fd).st_dev

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JobTree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_dir(self, parent: int, name: str, shown: str) -> int:
        try:
            fd = os.open(name, DIRECTORY, dir_fd=parent)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError)
            raise Refused(f"{shown} is not a directory of the job's tree ({_why(exc)})", missing=missing) from None
        if os.fstat(fd).st_dev != self._dev:
            os.close(fd)
            raise Refused(f"{shown} is on another file system (a mount)")
        return fd

    @contextlib.contextmanager
    def directory(self, path: str) -> Iterator[int]:
        """A descriptor of the directory at `path`, reached without following any link."""
        fd = os.dup(self._fd)
        try:
            walked: list[str] = []
            for part in PurePosixPath(path).parts:
                if part in ("..", "/"):
                    raise Refused(f"{path}: not a path inside the job's tree")
                walked.append(part)
                next_fd = self._open_dir(fd, part, "/".join(walked))
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def _open_file(self, dir_fd: int, name: str, shown: str, max_bytes: int) -> tuple[BinaryIO, int]:
        try:
            fd = os.open(name, FILE, dir_fd=dir_fd)
        except OSError as exc:
            raise Refused(f"{shown} was not read ({_why(exc)})", missing=isinstance(exc, FileNotFoundError)) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Refused(f"{shown} is not a regular file")
            if info.st_dev != self._dev:
                raise Refused(f"{shown} is on another file system (a mount)")
            if info.st_nlink != 1:
                raise Refused(f"{shown} has other hard links (it may be a file from outside the tree)")
            if info.st_size > max_bytes:
                raise Refused(f"{shown} is larger than the limit of {max_bytes} bytes")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), info.st_size
        except BaseException:
            os.close(fd)
            raise

    def read(self, path: str, max_bytes: int) -> bytes | None:
        """The whole of a small file (a tool's report); None, with a note, if it is refused. A file
        that does not exist is None without a note."""
        where = PurePosixPath(path)
        try:
            with self.directory(str(where.parent)) as dir_fd:
                f, size = self._open_file(dir_fd, where.name, path, max_bytes)
                with f:
                    return f.read(size + 1)[:max_bytes]
        except Refused as exc:
            if not exc.missing:
                self.note(f"not read: {exc}")
            return None

    def files(
        self, top: str, wanted: Callable[[str], bool], may_want_below: Callable[[str], bool], max_bytes: int
    ) -> Iterator[tuple[str, BinaryIO, int]]:
        """(path relative to `top`, the open file, its size) for each regular file under `top` that is
        `wanted`, in sorted order. Links, special files, hard links and mounts are skipped with a
        note when `wanted` (or `may_want_below`, for a directory) says the user asked for them; the
        file is closed when the iteration moves on."""
        try:
            with self.directory(top) as top_fd:
                yield from self._walk(top_fd, "", wanted, may_want_below, max_bytes, 0)
        except Refused as exc:
            self.note(f"nothing collected: {exc}")

    def _walk(
        self,
        dir_fd: int,
        prefix: str,
        wanted: Callable[[str], bool],
        may_want_below: Callable[[str], bool],
        max_bytes: int,
        depth: int,
    ) -> Iterator[tuple[str, BinaryIO, int]]:
        with os.scandir(dir_fd) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if not may_want_below(rel):
                    continue
                if depth >= MAX_DEPTH:
                    self.note(f"not collected: {rel} is nested deeper than {MAX_DEPTH} directories")
                    continue
                try:
                    sub = self._open_dir(dir_fd, entry.name, rel)
                except Refused as exc:
                    self.note(f"not collected: {exc}")
                    continue
                try:
                    yield from self._walk(sub, f"{rel}/", wanted, may_want_below, max_bytes, depth + 1)
                finally:
                    os.close(sub)
            elif entry.is_symlink():
                if wanted(rel) or may_want_below(rel):
                    self.note(f"not collected: {rel} is a symbolic link (links are not followed)")
            elif wanted(rel):
                try:
                    f, size = self._open_file(dir_fd, entry.name, rel, max_bytes)
                except Refused as exc:
                    self.note(f"not collected: {exc}")
                    continue
                with f:
                    yield rel, f, size


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link where a directory or file was expected
        return "a symbolic link, or not a directory; links are not followed"
    return exc.strerror or type(exc).__name__
