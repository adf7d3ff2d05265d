"""Source archives (tar.gz, zip) and inline file trees: checked before anything is written.

An archive member may not be absolute, climb out with `..`, be a link that points outside the tree,
or be a device; the tree has limits on its file count and unpacked size. The same checks run when an
upload arrives (so the user hears at once) and again when a worker unpacks it (so a file changed on
disk since is not trusted).
"""

import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from django.conf import settings


class ArchiveError(ValueError):
    """The archive or tree is refused; the message says which member and why."""


@dataclass(frozen=True)
class ArchiveInfo:
    format: str
    files: int
    unpacked_size: int


def check_relative_path(name: str) -> PurePosixPath:
    """A path inside the tree, or ArchiveError: not absolute, no `..`, no backslashes or NULs."""
    if not name or "\0" in name or "\\" in name:
        raise ArchiveError(f"{name!r}: not a valid path")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ArchiveError(f"{name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ArchiveError(f"{name!r}: '..' would leave the source tree")
    if path.parts in ((), (".",)):
        raise ArchiveError(f"{name!r}: not a file path")
    return path


def _check_link(name: str, target: str) -> None:
    if PurePosixPath(target).is_absolute():
        raise ArchiveError(f"{name!r}: link to an absolute path ({target!r}) is not allowed")
    depth = len(PurePosixPath(name).parent.parts)
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ArchiveError(f"{name!r}: link to {target!r} points outside the source tree")


class _Budget:
    def __init__(self) -> None:
        self.files = 0
        self.size = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.size += size
        if self.files > settings.JOB_SOURCE_MAX_FILES:
            raise ArchiveError(f"more than {settings.JOB_SOURCE_MAX_FILES} files")
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


def _tar_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    budget = _Budget()
    members = []
    for member in archive.getmembers():
        check_relative_path(member.name.removeprefix("./") or member.name)
        if member.issym():
            _check_link(member.name, member.linkname)
        elif member.islnk():  # a hard link names another member, from the archive's root
            check_relative_path(member.linkname)
        elif not (member.isfile() or member.isdir()):
            raise ArchiveError(f"{member.name!r}: devices, fifos and other special files are not allowed")
        budget.add(member.size if member.isfile() else 0)
        members.append(member)
    return members


def _zip_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    budget = _Budget()
    for info in archive.infolist():
        check_relative_path(info.filename.rstrip("/") if info.is_dir() else info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{info.filename!r}: symbolic links in zip archives are not allowed")
        budget.add(info.file_size)
    return archive.infolist()


def inspect(fileobj: BinaryIO) -> ArchiveInfo:
    """Check every member without unpacking; ArchiveError says what is wrong."""
    fmt = sniff(fileobj)
    try:
        if fmt == "tar.gz":
            with tarfile.open(fileobj=fileobj, mode="r:gz") as archive:
                members = _tar_members(archive)
                info = ArchiveInfo(fmt, sum(m.isfile() for m in members), sum(m.size for m in members))
        else:
            with zipfile.ZipFile(fileobj) as archive:
                members = _zip_members(archive)
                info = ArchiveInfo(fmt, sum(not m.is_dir() for m in members), sum(m.file_size for m in members))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ArchiveError(f"unreadable {fmt} archive: {exc}") from exc
    finally:
        fileobj.seek(0)
    return info


def extract(fileobj: BinaryIO, dest: Path) -> None:
    """Unpack into `dest` after checking every member again."""
    fmt = sniff(fileobj)
    try:
        if fmt == "tar.gz":
            with tarfile.open(fileobj=fileobj, mode="r:gz") as archive:
                # The "data" filter refuses what the checks above refuse, and also drops set-uid bits.
                archive.extractall(dest, members=_tar_members(archive), filter="data")
        else:
            with zipfile.ZipFile(fileobj) as archive:
                archive.extractall(dest, members=_zip_members(archive))  # noqa: S202 (members checked)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise ArchiveError(f"unreadable {fmt} archive: {exc}") from exc


def check_files(files: dict[str, str]) -> None:
    """An inline tree: paths as for archive members, within the same limits."""
    budget = _Budget()
    for name, text in files.items():
        check_relative_path(name)
        budget.add(len(text.encode()))


def write_files(files: dict[str, str], dest: Path) -> None:
    check_files(files)
    for name, text in files.items():
        path = dest / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:  # e.g. "a" and "a/b" both given
            raise ArchiveError(f"{name!r}: {exc.strerror}") from exc
