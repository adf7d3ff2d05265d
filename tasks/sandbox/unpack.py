"""Unpacking a job's source into its work directory (on workers): an archive, checked again member by
member as `apps.jobs.archives` checked it when it was uploaded (a file changed on disk since is not
trusted), or an inline tree. Every file is new, every directory is opened without following links,
and the bytes actually written count against the limits.
"""

import contextlib
import errno
import functools
import gzip
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from apps.jobs.archives import (
    ArchiveError,
    Budget,
    Member,
    check_files,
    check_relative_path,
    open_tar,
    sniff,
    tar_headers,
    tar_member,
    tar_members,
    zip_entries,
    zip_members,
)

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_BLOCK = 64 * 1024

# Errors that mean the archive contradicts itself (a name twice, a file where a folder goes), not the disk.
_MEMBER_CONFLICTS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}


def _untar(archive: tarfile.TarFile, members: list[Member], root: int) -> None:
    """Write the checked members, reading the archive a second time, member by member: each header
    must be the one checked, data is streamed, no path is ever opened through a link (the links
    themselves are made last)."""
    budget = Budget()  # the bytes actually written
    planned = {member.index: member for member in members}
    links: list[Member] = []
    for index, info in enumerate(tar_headers(archive)):
        if index not in planned:
            if not info.isdir():  # only the root entry (or the stripped folder) is left out
                raise ArchiveError(f"{info.name!r}: the archive changed while it was read")
            continue
        member = planned.pop(index)
        if info.name != member.name or tar_member(info, index).kind != member.kind:
            raise ArchiveError(f"{info.name!r}: the archive changed while it was read")
        with _naming(member):
            if member.kind == "dir":
                os.close(_directory(root, member.parts))
            elif member.kind == "file":
                data = archive.extractfile(info)
                blocks = iter(functools.partial(data.read, _BLOCK), b"")
                _write_file(root, member.parts, blocks, budget, 0o755 if member.executable else 0o644)
            elif member.kind == "hardlink":
                _hard_link(root, tuple(member.target.split("/")), member.parts)
            else:
                links.append(member)
    if planned:
        raise ArchiveError("the archive changed while it was read")
    for member in links:
        with _naming(member):
            parent = _directory(root, member.parts[:-1])
            try:
                os.symlink(member.target, member.parts[-1], dir_fd=parent)
            finally:
                os.close(parent)


@contextlib.contextmanager
def _naming(member: Member) -> Iterator[None]:
    """An error that the archive itself causes (a path twice, a file where a folder goes), naming the member."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _MEMBER_CONFLICTS:
            raise
        raise ArchiveError(f"{member.name!r}: {exc.strerror}") from exc


def _unzip(archive: zipfile.ZipFile, members: list[Member], root: int) -> None:
    budget = Budget()  # the bytes actually written: a declared size is the archive's word
    infos = archive.infolist()
    for member in members:
        with _naming(member):
            if member.kind == "dir":
                os.close(_directory(root, member.parts))
                continue
            with archive.open(infos[member.index]) as data:
                blocks = iter(functools.partial(data.read, _BLOCK), b"")
                _write_file(root, member.parts, blocks, budget, 0o755 if member.executable else 0o644)


def extract(fileobj: BinaryIO, dest: Path) -> None:
    """Unpack into `dest` after checking every member again, with the same normalisation as `inspect`."""
    fmt = sniff(fileobj)
    try:
        with _opened(dest) as root:
            if fmt == "tar.gz":
                with open_tar(fileobj) as archive:
                    members = tar_members(archive)
                fileobj.seek(0)
                with open_tar(fileobj) as archive:
                    _untar(archive, members, root)
            else:
                zip_entries(fileobj)
                with zipfile.ZipFile(fileobj) as archive:
                    _unzip(archive, zip_members(archive), root)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ArchiveError(f"unreadable {fmt} archive: {exc}") from exc


@contextlib.contextmanager
def _opened(dest: Path) -> Iterator[int]:
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, _DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _directory(root: int, parts: Iterable[str]) -> int:
    """A descriptor for the directory `parts` under `root`, made if missing; never through a symlink."""
    fd = os.dup(root)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            inner = os.open(part, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(root: int, parts: tuple[str, ...], blocks: Iterable[bytes], budget: Budget, mode: int = 0o644) -> None:
    """A new file (never an existing one, never through a symlink) at `parts` under `root`."""
    parent = _directory(root, parts[:-1])
    try:
        fd = os.open(parts[-1], _NEW_FILE, mode, dir_fd=parent)
        os.fchmod(fd, mode)  # whatever the umask
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        for block in blocks:
            budget.spend(len(block))
            out.write(block)


def _hard_link(root: int, target: tuple[str, ...], parts: tuple[str, ...]) -> None:
    """A hard link at `parts` to the file already unpacked at `target` (both under `root`)."""
    source, parent = _directory(root, target[:-1]), _directory(root, parts[:-1])
    try:
        os.link(target[-1], parts[-1], src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(source)
        os.close(parent)


def write_files(files: dict[str, str], dest: Path) -> None:
    check_files(files)
    budget = Budget()
    with _opened(dest) as root:
        for name, text in files.items():
            try:
                _write_file(root, check_relative_path(name).parts, [text.encode()], budget)
            except OSError as exc:  # e.g. "a" and "a/b" both given
                raise ArchiveError(f"{name!r}: {exc.strerror}") from exc
