"""Source archives (tar.gz, zip) and inline file trees: checked before anything is written.

An archive is read as its author's adversary would write it: members are streamed and the limits on
file count, entry count and unpacked size stop the read the moment they are passed. A member may not
be absolute, climb out with `..`, be a link that points outside the tree, or be a device.

Archives are taken as people make them: `tar czf src.tgz -C project .` writes `./` and `./pkg/x.py`,
`git archive --prefix=project-1.0/` and GitHub tarballs put everything under one folder. `_normalise`
maps both formats onto the tree the user means (no `./`, no single top-level folder), and every check
that depends on a path runs after it. The same code runs when an upload arrives (so the user hears at
once, and the stored counts match what is unpacked) and again when a worker unpacks it (so a file
changed on disk since is not trusted): writing the tree out is the worker's, `tasks.sandbox.unpack`.
"""

import contextlib
import dataclasses
import gzip
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Literal

from django.conf import settings

Kind = Literal["file", "dir", "symlink", "hardlink"]


class ArchiveError(ValueError):
    """The archive or tree is refused; the message says which member and why."""


@dataclass(frozen=True)
class ArchiveInfo:
    format: str
    files: int
    unpacked_size: int


@dataclass(frozen=True)
class Member:
    """A member of either format: `name` as written (for messages), `parts` where it goes."""

    name: str
    parts: tuple[str, ...]  # `./` and `.` dropped; () is the tree's root
    kind: Kind
    size: int
    target: str  # a symlink's target (relative to the link) or a hard link's (from the archive root)
    index: int  # its place in the archive
    executable: bool = False


MAX_NAME_BYTES = 2048  # a member's path
MAX_DEPTH = 64  # components of a member's path
MAX_NAMES_BYTES = 8 * 1024 * 1024  # all members' paths together


def _max_entries() -> int:
    # Directories are not files, but a million empty ones is as costly to read as a million files.
    return 2 * settings.JOB_SOURCE_MAX_FILES


def _parts(name: str) -> tuple[str, ...]:
    """A member's path split, with `.` components dropped, or ArchiveError if it could leave the tree."""
    if not name or "\0" in name or "\\" in name:
        raise ArchiveError(f"{name!r}: not a valid path")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ArchiveError(f"{name!r}: not a valid path (not UTF-8)") from None
    if size > MAX_NAME_BYTES:
        raise ArchiveError(f"{name[:100]!r}...: a path longer than {MAX_NAME_BYTES} bytes")
    path = PurePosixPath(name)
    if len(path.parts) > MAX_DEPTH:
        raise ArchiveError(f"{name[:100]!r}...: nested deeper than {MAX_DEPTH} directories")
    if path.is_absolute():
        raise ArchiveError(f"{name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ArchiveError(f"{name!r}: '..' would leave the source tree")
    return path.parts


def check_relative_path(name: str) -> PurePosixPath:
    """A path inside the tree, or ArchiveError: not absolute, no `..`, no backslashes or NULs."""
    parts = _parts(name)
    if not parts:
        raise ArchiveError(f"{name!r}: not a file path")
    return PurePosixPath(*parts)


def _check_link(name: str, parts: tuple[str, ...], target: str) -> None:
    if PurePosixPath(target).is_absolute():
        raise ArchiveError(f"{name!r}: link to an absolute path ({target!r}) is not allowed")
    depth = len(parts) - 1
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ArchiveError(f"{name!r}: link to {target!r} points outside the source tree")


class Budget:
    """Counts members as they stream past and refuses the moment a limit is passed."""

    def __init__(self) -> None:
        self.files = 0
        self.entries = 0
        self.size = 0
        self.names = 0

    def add(self, is_file: bool, size: int = 0, name: str = "") -> None:
        self.entries += 1
        self.files += is_file
        self.names += len(name)
        if self.names > MAX_NAMES_BYTES:
            raise ArchiveError(f"more than {MAX_NAMES_BYTES} bytes of paths")
        if self.files > settings.JOB_SOURCE_MAX_FILES:
            raise ArchiveError(f"more than {settings.JOB_SOURCE_MAX_FILES} files")
        if self.entries > _max_entries():
            raise ArchiveError(f"more than {_max_entries()} entries (files and directories)")
        self.spend(size)

    def spend(self, size: int) -> None:
        """Bytes about to be written, on top of what `add` declared (used alone when unpacking)."""
        self.size += size
        if self.size > settings.JOB_SOURCE_MAX_BYTES:
            raise ArchiveError(f"more than {settings.JOB_SOURCE_MAX_BYTES} bytes unpacked")


def sniff(fileobj: BinaryIO) -> str:
    head = fileobj.read(4)
    fileobj.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"PK"):
        return "zip"
    raise ArchiveError("not a tar.gz or zip archive")


def _normalise(members: list[Member]) -> list[Member]:
    """The tree the user means, for both formats: the root entry dropped, a single top-level folder
    stripped, hard-link targets mapped the same way, symlinks checked where they will land.

    A folder X is stripped when every member is X itself or below it, at least one is below it, and
    X itself (if listed) is a directory. A path given twice, or as both a file and a folder, is refused:
    the file count would not be what is unpacked, and unpacking would fail half-way. So is a member
    below a symbolic link of the archive: unpacking it would write wherever the link points.
    """
    tops = {m.parts[0] for m in members if m.parts}
    prefix: tuple[str, ...] = ()
    if len(tops) == 1 and any(len(m.parts) > 1 for m in members):
        (top,) = tops
        if all(m.kind == "dir" for m in members if m.parts == (top,)):
            prefix = (top,)

    tree: list[Member] = []
    files: set[str] = set()  # what a hard link may name: files (and links to them) so far
    others: dict[str, str] = {}  # every path that is not a directory, and what it is
    for member in members:
        parts = member.parts[len(prefix) :]
        if not parts:
            if member.kind != "dir":
                raise ArchiveError(f"{member.name!r}: not a file path")
            continue  # the root itself: the destination
        path = "/".join(parts)
        if member.kind != "dir":
            if path in others:
                raise ArchiveError(f"{member.name!r}: given twice")
            others[path] = member.kind
        target = member.target
        if member.kind == "hardlink":
            linked = _parts(target)
            # tar names a hard link's target by an earlier member; anything else cannot be linked safely.
            if linked[: len(prefix)] != prefix or "/".join(linked[len(prefix) :]) not in files:
                raise ArchiveError(f"{member.name!r}: hard link to {target!r} names no file before it in the archive")
            target = "/".join(linked[len(prefix) :])
        elif member.kind == "symlink":
            _check_link(member.name, parts, target)
        if member.kind in ("file", "hardlink"):
            files.add(path)
        tree.append(dataclasses.replace(member, parts=parts, target=target))

    folders = {"/".join(m.parts) for m in tree if m.kind == "dir"}
    for member in tree:
        if member.kind != "dir" and "/".join(member.parts) in folders:
            raise ArchiveError(f"{member.name!r}: both a file and a folder")
        for depth in range(1, len(member.parts)):  # every folder it lies in (at most MAX_DEPTH)
            above = others.get("/".join(member.parts[:depth]))
            if above == "symlink":
                raise ArchiveError(f"{member.name!r}: inside a symbolic link of the archive")
            if above is not None:
                raise ArchiveError(f"{'/'.join(member.parts[:depth])!r}: both a file and a folder")
    return tree


class _Inflated:
    """The tar stream inside a gzip file, as tarfile reads it, never past what a real tree needs.

    tarfile reads a pax or GNU long-name header's body in one call of the size the header declares,
    and a GNU sparse map until it ends: a few kilobytes of gzip can ask for gigabytes. Member data is
    read in 16 KiB blocks, so a read over `MAX_READ` is a hostile header.
    """

    MAX_READ = 64 * 1024 + 512  # a pax header for a long name; member data comes 16 KiB at a time

    def __init__(self, gz: gzip.GzipFile) -> None:
        self._gz = gz
        # Every member's data, and for each entry room for its header, padding and extended headers.
        self._limit = settings.JOB_SOURCE_MAX_BYTES + _max_entries() * 16 * 1024 + self.MAX_READ

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= self.MAX_READ:
            raise ArchiveError(f"unreadable tar.gz archive: a header of {size} bytes")
        self._check(self._gz.tell() + size)
        return self._gz.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check(offset if whence == os.SEEK_SET else self._gz.tell() + offset)
        return self._gz.seek(offset, whence)

    def tell(self) -> int:
        return self._gz.tell()

    def _check(self, end: int) -> None:
        if end > self._limit:
            raise ArchiveError(f"more than {self._limit} bytes unpacked, headers included")


@contextlib.contextmanager
def open_tar(fileobj: BinaryIO) -> Iterator[tarfile.TarFile]:
    with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz, tarfile.open(fileobj=_Inflated(gz), mode="r:") as archive:
        yield archive


def tar_headers(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Each header as it is read; tarfile keeps none of them (it would keep them all, in `members`)."""
    while (info := archive.next()) is not None:
        archive.members.clear()
        yield info


def tar_member(info: tarfile.TarInfo, index: int) -> Member:
    parts = _parts(info.name)
    kind: Kind
    if info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"  # its target is checked once it is known where the link lands
    elif info.islnk():
        kind = "hardlink"
        _parts(info.linkname)
    elif info.isfile() and not info.issparse():
        kind = "file"
    else:
        raise ArchiveError(f"{info.name!r}: devices, fifos, sparse and other special files are not allowed")
    size = info.size if kind == "file" else 0
    return Member(info.name, parts, kind, size, info.linkname, index, bool(info.mode & 0o111))


def tar_members(archive: tarfile.TarFile) -> list[Member]:
    budget = Budget()
    members = []
    for index, info in enumerate(tar_headers(archive)):  # getmembers() would read them all before any limit
        member = tar_member(info, index)
        budget.add(member.kind != "dir", member.size, info.name)
        members.append(member)
    return _normalise(members)


_EOCD_SIGNATURE, _EOCD_ENTRIES, _EOCD_SIZE, _EOCD_LOCATION = 0, 4, 5, 9  # indices into _EndRecData's list
_ZIP64_END_RECORDS = 56 + 20  # the zip64 end record and its locator, between the directory and the end
_CENTRAL_HEADER = struct.Struct("<4s24x3H12x")  # signature; name, extra and comment lengths
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def zip_entries(fileobj: BinaryIO) -> int:
    """The number of central-directory entries, or ArchiveError as soon as it passes the limit.

    `zipfile.ZipFile` reads and keeps every entry, and stops by the directory's byte size whatever the
    end record's count says. So the count (zip64 included) is checked first, from the end of the file,
    then the headers are walked without being kept, in case the count lies.
    Reference: `len(zipfile.ZipFile(fileobj).infolist())`; tests/test_archives.py pins the two together.
    """
    end = zipfile._EndRecData(fileobj)  # private, but it finds the end record and its zip64 form as ZipFile does
    if not end:
        raise ArchiveError("unreadable zip archive: no end of central directory record")
    if end[_EOCD_ENTRIES] > _max_entries():
        raise ArchiveError(f"more than {_max_entries()} entries (files and directories)")
    start = end[_EOCD_LOCATION] - end[_EOCD_SIZE]
    if end[_EOCD_SIGNATURE] == zipfile.stringEndArchive64:
        start -= _ZIP64_END_RECORDS
    if start < 0:
        raise ArchiveError("unreadable zip archive: bad offset for the central directory")
    fileobj.seek(start)
    count = walked = 0
    while walked < end[_EOCD_SIZE]:
        header = fileobj.read(_CENTRAL_HEADER.size)
        if len(header) != _CENTRAL_HEADER.size or header[:4] != zipfile.stringCentralDir:
            raise ArchiveError("unreadable zip archive: bad central directory")
        _, *lengths = _CENTRAL_HEADER.unpack(header)
        fileobj.seek(sum(lengths), os.SEEK_CUR)
        walked += _CENTRAL_HEADER.size + sum(lengths)
        count += 1
        if count > _max_entries():
            raise ArchiveError(f"more than {_max_entries()} entries (files and directories)")
    return count


def zip_members(archive: zipfile.ZipFile) -> list[Member]:
    budget = Budget()
    members = []
    for index, info in enumerate(archive.infolist()):
        parts = _parts(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{info.filename!r}: symbolic links in zip archives are not allowed")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{info.filename!r}: encrypted members are not supported")
        if info.compress_type not in _ZIP_METHODS:
            raise ArchiveError(f"{info.filename!r}: compression method {info.compress_type} is not supported")
        kind: Kind = "dir" if info.is_dir() else "file"
        size = info.file_size if kind == "file" else 0
        budget.add(kind == "file", size, info.filename)
        members.append(Member(info.filename, parts, kind, size, "", index, bool((info.external_attr >> 16) & 0o111)))
    return _normalise(members)


def inspect(fileobj: BinaryIO) -> ArchiveInfo:
    """Check every member without unpacking; ArchiveError says what is wrong."""
    fmt = sniff(fileobj)
    try:
        if fmt == "tar.gz":
            with open_tar(fileobj) as archive:
                members = tar_members(archive)
        else:
            zip_entries(fileobj)
            with zipfile.ZipFile(fileobj) as archive:
                members = zip_members(archive)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"unreadable {fmt} archive: {exc}") from exc
    finally:
        fileobj.seek(0)
    return ArchiveInfo(fmt, sum(m.kind != "dir" for m in members), sum(m.size for m in members))


def check_files(files: dict[str, str]) -> None:
    """An inline tree: paths as for archive members, within the same limits."""
    budget = Budget()
    for name, text in files.items():
        check_relative_path(name)
        try:
            size = len(text.encode())
        except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can carry
            raise ArchiveError(f"{name!r}: the text is not valid Unicode") from None
        budget.add(True, size)
