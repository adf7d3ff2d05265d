"""Source archives read as people make them and as an attacker would: `inspect` and `extract` directly."""

import gzip
import io
import os
import struct
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from django.test import override_settings

from apps.jobs import archives
from apps.jobs.archives import ArchiveError, inspect
from tasks.sandbox import unpack
from tasks.sandbox.unpack import extract, write_files
from tests.tooljobs import tar_gz, zip_bytes


class Counting(io.BytesIO):
    """An in-memory archive that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n
        return n


def unpacked(dest: Path) -> dict[str, str]:
    """What `extract` left: each file's content, each symlink as `-> target`; directories left out."""
    tree = {}
    for path in sorted(dest.rglob("*")):
        name = path.relative_to(dest).as_posix()
        if path.is_symlink():
            tree[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            tree[name] = path.read_text(encoding="utf-8")
    return tree


def extracted(data: bytes, tmp_path: Path) -> dict[str, str]:
    dest = tmp_path / "src"
    dest.mkdir()
    extract(io.BytesIO(data), dest)
    return unpacked(dest)


def tar_of(members: list[tarfile.TarInfo | tuple[str, str]]) -> bytes:
    """A tar.gz of (name, text) files and ready-made TarInfos (directories, links), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, text = member
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                archive.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def link(name: str, target: str, type: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = target
    return info


def headers_only(count: int, type: bytes = tarfile.REGTYPE) -> bytes:
    """A tar.gz of `count` zero-size members, written header by header (tarfile's writer takes 17s)."""
    template = bytearray(tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT))
    template[0:100] = bytes(100)
    template[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
    template[156:157] = type
    base = sum(template)
    out = bytearray()
    for i in range(count):
        name = b"f%d" % i
        block = bytearray(template)
        block[: len(name)] = name
        block[148:156] = b"%06o\0 " % (base + sum(name))
        out += block
    return gzip.compress(bytes(out + bytes(1024)), compresslevel=1)


@pytest.fixture(scope="module")
def many_files() -> bytes:
    return headers_only(200_000)


@pytest.fixture(scope="module")
def zip64_entries() -> bytes:
    """More entries than a plain end record can count, so zipfile writes a zip64 end record."""
    return zip_bytes({f"f{i}": "" for i in range(0x10000 + 10)})


# --- archives as people make them -------------------------------------------------------------------


def test_a_tar_czf_of_a_directory_with_dot_unpacks_at_the_root(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "x.py").write_text("x = 1\n")
    (project / "README").write_text("hello\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(project, arcname=".")
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert sorted(archive.getnames()) == [".", "./README", "./pkg", "./pkg/x.py"]

    info = inspect(io.BytesIO(data))
    tree = extracted(data, tmp_path)

    assert tree == {"README": "hello\n", "pkg/x.py": "x = 1\n"}
    assert (info.files, info.unpacked_size) == (2, len("hello\n") + len("x = 1\n"))


PREFIXED = {"project-1.0/pkg/x.py": "x", "project-1.0/README": "r"}


@pytest.mark.parametrize(
    "data",
    [
        tar_gz(PREFIXED),
        tar_of([directory("project-1.0"), directory("project-1.0/pkg"), *PREFIXED.items()]),
        zip_bytes(PREFIXED),
        zip_bytes({"project-1.0/": "", "project-1.0/pkg/": "", **PREFIXED}),
    ],
    ids=["tar.gz", "tar.gz with folder entries", "zip", "zip with folder entries"],
)
def test_a_single_top_level_folder_is_stripped(data: bytes, tmp_path: Path) -> None:
    info = inspect(io.BytesIO(data))
    tree = extracted(data, tmp_path)

    assert tree == {"README": "r", "pkg/x.py": "x"}
    assert info.files == len(tree) == 2


def test_a_single_folder_listed_with_dot_slash_and_its_own_entry_is_stripped(tmp_path: Path) -> None:
    data = tar_of([directory("."), directory("./project"), directory("./project/pkg"), ("./project/pkg/x.py", "x")])

    assert extracted(data, tmp_path) == {"pkg/x.py": "x"}


def test_a_git_archive_with_a_prefix_unpacks_without_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "x.py").write_text("x = 1\n")
    (repo / "README.md").write_text("# hi\n")
    git = ["git", "-C", str(repo), "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    data = subprocess.run(
        [*git, "archive", "--format=tar.gz", "--prefix=project-1.0/", "HEAD"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert "comment" in archive.pax_headers  # git's global header, with the commit id
        assert all(name.startswith("project-1.0") for name in archive.getnames())

    info = inspect(io.BytesIO(data))
    tree = extracted(data, tmp_path)

    assert tree == {"README.md": "# hi\n", "pkg/__init__.py": "", "pkg/x.py": "x = 1\n"}
    assert info.files == len(tree)


@pytest.mark.parametrize(
    "members",
    [
        {"a/x.py": "x", "b/y.py": "y"},  # two folders
        {"a/x.py": "x", "README": "r"},  # a folder and a file
        {"README": "r"},  # one file: nothing below it
    ],
)
@pytest.mark.parametrize("make", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_a_tree_without_a_single_folder_is_kept_as_it_is(
    make: Callable[[dict], bytes], members: dict[str, str], tmp_path: Path
) -> None:
    data = make(members)

    assert extracted(data, tmp_path) == members
    assert inspect(io.BytesIO(data)).files == len(members)


@pytest.mark.parametrize(
    "data",
    [
        tar_of([("project", "a file"), ("project/x.py", "x")]),  # a top-level file is never stripped
        tar_of([("a.py", "x"), directory("a.py")]),
        tar_of([link("a", "b"), directory("a")]),
        zip_bytes({"a": "x", "a/b.py": "y"}),
    ],
)
def test_a_path_that_is_both_a_file_and_a_folder_is_refused_at_upload(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="both a file and a folder"):
        inspect(io.BytesIO(data))
    with pytest.raises(ArchiveError, match="both a file and a folder"):
        extracted(data, tmp_path)


@pytest.mark.parametrize(
    "data", [tar_of([("./a.py", "1"), ("a.py", "2")]), zip_bytes({"p/a.py": "1", "p/./a.py": "2"})]
)
def test_a_path_given_twice_is_refused_at_upload(data: bytes) -> None:
    with pytest.raises(ArchiveError, match="given twice"):
        inspect(io.BytesIO(data))


def test_a_dot_slash_zip_unpacks_at_the_root(tmp_path: Path) -> None:
    data = zip_bytes({"./": "", "./pkg/": "", "./pkg/x.py": "x", "./README": "r"})

    info = inspect(io.BytesIO(data))

    assert extracted(data, tmp_path) == {"README": "r", "pkg/x.py": "x"}
    assert info.files == 2


def test_a_hard_link_in_a_prefixed_archive_links_to_the_stripped_path(tmp_path: Path) -> None:
    data = tar_of(
        [
            directory("./project-1.0"),
            ("./project-1.0/a.txt", "same"),
            link("./project-1.0/b.txt", "./project-1.0/a.txt", tarfile.LNKTYPE),
        ]
    )

    info = inspect(io.BytesIO(data))
    tree = extracted(data, tmp_path)

    assert tree == {"a.txt": "same", "b.txt": "same"}
    assert (tmp_path / "src" / "a.txt").stat().st_ino == (tmp_path / "src" / "b.txt").stat().st_ino
    assert info.files == 2


def test_a_symlink_that_stays_inside_after_stripping_is_kept(tmp_path: Path) -> None:
    data = tar_of([("project/c.py", "c"), link("project/a/link", "../c.py")])

    tree = extracted(data, tmp_path)

    assert tree == {"a/link": "-> ../c.py", "c.py": "c"}
    assert (tmp_path / "src" / "a" / "link").read_text() == "c"
    assert inspect(io.BytesIO(data)).files == 2


# --- escapes, still refused after normalisation -----------------------------------------------------


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([("project/ok.py", "x"), ("project/../../x", "x")], "'..'"),
        ([("project/ok.py", "x"), link("project/a", "../../etc/passwd")], "outside"),
        # inside the tree as archived (project/x), outside it once project/ is stripped
        ([("project/ok.py", "x"), link("project/a/b", "../../x")], "outside"),
        ([("project/ok.py", "x"), link("project/a", "/etc/passwd")], "absolute"),
        ([("./ok.py", "x"), ("/./etc/x", "x")], "absolute"),
        ([("project/ok.py", "x"), link("project/h", "project/../../etc/passwd", tarfile.LNKTYPE)], "'..'"),
        ([("project/ok.py", "x"), link("project/h", "other/x", tarfile.LNKTYPE)], "no file before it"),
        ([link("project/h", "project/later.py", tarfile.LNKTYPE), ("project/later.py", "x")], "no file before it"),
        ([("project/ok.py", "x"), link("project/fifo", "", tarfile.FIFOTYPE)], "special files"),
        ([("a\\..\\..\\x", "x")], "not a valid path"),
    ],
)
def test_an_escape_is_refused_after_normalisation(
    members: list[tarfile.TarInfo | tuple[str, str]], reason: str, tmp_path: Path
) -> None:
    data = tar_of(members)

    with pytest.raises(ArchiveError, match=reason):
        inspect(io.BytesIO(data))
    with pytest.raises(ArchiveError, match=reason):
        extracted(data, tmp_path)
    assert list((tmp_path / "src").iterdir()) == []


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"project/ok.py": "x", "project/../../x": "x"}, "'..'"),
        ({"./ok.py": "x", "/etc/x": "x"}, "absolute"),
    ],
)
def test_a_zip_escape_is_refused_after_normalisation(members: dict[str, str], reason: str, tmp_path: Path) -> None:
    data = zip_bytes(members)

    with pytest.raises(ArchiveError, match=reason):
        inspect(io.BytesIO(data))
    with pytest.raises(ArchiveError, match=reason):
        extracted(data, tmp_path)


def test_an_encrypted_zip_member_is_refused_at_upload(tmp_path: Path) -> None:
    data = bytearray(zip_bytes({"secret.py": "x"}))
    header = data.index(zipfile.stringCentralDir)
    data[header + 8] |= 0x1  # the "encrypted" flag; zipfile cannot write encrypted members itself
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].flag_bits & 0x1

    with pytest.raises(ArchiveError, match="encrypted"):
        inspect(io.BytesIO(data))


# --- limits stop the read ---------------------------------------------------------------------------


@override_settings(JOB_SOURCE_MAX_FILES=100)
@pytest.mark.parametrize("step", ["inspect", "extract"])
def test_a_tar_of_many_members_is_refused_after_reading_a_small_part(
    many_files: bytes, step: str, tmp_path: Path
) -> None:
    data = Counting(many_files)

    with pytest.raises(ArchiveError, match="more than 100 files"):
        inspect(data) if step == "inspect" else extract(data, tmp_path)

    assert data.bytes_read < len(many_files) / 20, (data.bytes_read, len(many_files))
    assert not any(tmp_path.iterdir())


@override_settings(JOB_SOURCE_MAX_FILES=100)
def test_a_tar_of_many_empty_directories_is_refused_early() -> None:
    full = headers_only(50_000, tarfile.DIRTYPE)
    data = Counting(full)

    with pytest.raises(ArchiveError, match="more than 200 entries"):
        inspect(data)

    assert data.bytes_read < len(full) / 20, (data.bytes_read, len(full))


@override_settings(JOB_SOURCE_MAX_FILES=100)
def test_empty_directories_do_not_count_as_files(tmp_path: Path) -> None:
    data = tar_of([directory(f"d{i}") for i in range(150)] + [("d0/x.py", "x")])

    assert inspect(io.BytesIO(data)).files == 1


@override_settings(JOB_SOURCE_MAX_FILES=100)
def test_a_zip_whose_end_record_counts_too_many_entries_is_refused_from_its_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = zip_bytes({f"f{i}": "" for i in range(50_000)})
    data = Counting(full)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # the central directory is never handed to zipfile

    with pytest.raises(ArchiveError, match="more than 200 entries"):
        inspect(data)

    assert data.bytes_read < 100, data.bytes_read


@override_settings(JOB_SOURCE_MAX_FILES=100)
def test_a_zip64_end_record_over_the_limit_is_refused_from_its_tail(zip64_entries: bytes) -> None:
    assert zipfile.stringEndArchive64 in zip64_entries[-200:]
    data = Counting(zip64_entries)

    with pytest.raises(ArchiveError, match="more than 200 entries"):
        inspect(data)

    assert data.bytes_read < 200, data.bytes_read


@override_settings(JOB_SOURCE_MAX_FILES=100)
def test_a_zip_whose_end_record_understates_its_entries_is_refused_while_walking() -> None:
    honest = zip_bytes({f"f{i}": "" for i in range(5_000)})
    end = honest.rindex(zipfile.stringEndArchive)
    lying = honest[: end + 8] + struct.pack("<2H", 1, 1) + honest[end + 12 :]
    assert len(zipfile.ZipFile(io.BytesIO(lying)).infolist()) == 5_000  # zipfile reads them all regardless
    data = Counting(lying)

    with pytest.raises(ArchiveError, match="more than 200 entries"):
        inspect(data)

    assert data.bytes_read < 201 * 46 + 100, data.bytes_read  # the fixed part of 201 headers, no names


def _with_comment(data: bytes) -> bytes:
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = b"a comment, so the end record is searched for"
    return buffer.getvalue()


@override_settings(JOB_SOURCE_MAX_FILES=40_000)
@pytest.mark.parametrize("shape", ["plain", "comment", "prepended", "zip64", "empty"])
def test_the_central_directory_walk_counts_what_zipfile_counts(shape: str, zip64_entries: bytes) -> None:
    data = {
        "plain": lambda: zip_bytes({"a/": "", "a/b.py": "b", "c.py": "c" * 1000}),
        "comment": lambda: _with_comment(zip_bytes({"a.py": "a", "b.py": "b"})),
        "prepended": lambda: b"#!/bin/sh\nexit 0\n" + zip_bytes({"a.py": "a", "b.py": "b", "c.py": "c"}),
        "zip64": lambda: zip64_entries,
        "empty": lambda: zip_bytes({}),
    }[shape]()

    assert archives.zip_entries(io.BytesIO(data)) == len(zipfile.ZipFile(io.BytesIO(data)).infolist())


def test_a_hostile_tar_header_is_refused_before_it_is_read() -> None:
    # A pax header declaring 64 MiB: tarfile would read all of it into memory in one call.
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 64 * 1024 * 1024
    full = gzip.compress(header.tobuf(format=tarfile.USTAR_FORMAT) + bytes(header.size + 1024))
    data = Counting(full)

    with pytest.raises(ArchiveError, match="unreadable"):
        inspect(data)

    assert data.bytes_read < len(full) / 4, (data.bytes_read, len(full))


@override_settings(JOB_SOURCE_MAX_BYTES=1000)
def test_unzipping_counts_the_bytes_written_not_the_sizes_declared(tmp_path: Path) -> None:
    data = zip_bytes({"a.txt": "0" * 600, "b.txt": "0" * 600})
    with override_settings(JOB_SOURCE_MAX_BYTES=10_000), zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archives.zip_members(archive)  # accepted under a larger limit, as if declared small

    with (
        zipfile.ZipFile(io.BytesIO(data)) as archive,
        unpack._opened(tmp_path) as root,
        pytest.raises(ArchiveError, match="unpacked"),
    ):
        unpack._unzip(archive, members, root)

    assert (tmp_path / "a.txt").read_text() == "0" * 600
    assert (tmp_path / "b.txt").read_text() == ""  # refused before its first block was written


# --- writing never follows a symlink ----------------------------------------------------------------


@pytest.mark.parametrize("planted", ["pkg", "pkg/x.py"])
def test_unzipping_never_writes_through_a_symlink(planted: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "src"
    (dest / "pkg").mkdir(parents=True)
    if planted == "pkg":
        (dest / "pkg").rmdir()
        (dest / "pkg").symlink_to(outside)
    else:
        (dest / "pkg" / "x.py").symlink_to(outside / "x.py")

    with pytest.raises(ArchiveError, match=r"pkg/x\.py"):
        extract(io.BytesIO(zip_bytes({"README": "r", "pkg/x.py": "x"})), dest)

    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("planted", ["pkg", "pkg/x.py"])
def test_write_files_never_writes_through_a_symlink(planted: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "src"
    (dest / "pkg").mkdir(parents=True)
    if planted == "pkg":
        (dest / "pkg").rmdir()
        (dest / "pkg").symlink_to(outside)
    else:
        (dest / "pkg" / "x.py").symlink_to(outside / "x.py")

    with pytest.raises(ArchiveError, match=r"pkg/x\.py"):
        write_files({"pkg/x.py": "x"}, dest)

    assert list(outside.iterdir()) == []


def test_write_files_writes_the_tree(tmp_path: Path) -> None:
    files = {"a.py": "a", "pkg/b.py": "b", "pkg/deep/c.py": "ç\n"}

    write_files(files, tmp_path / "src")

    assert unpacked(tmp_path / "src") == files


def test_write_files_refuses_a_file_where_a_folder_goes(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=r"'a/b\.py'"):
        write_files({"a": "x", "a/b.py": "y"}, tmp_path / "src")


def test_a_member_inside_a_symlink_of_the_archive_is_refused(tmp_path: Path) -> None:
    # A chain of links whose text stays inside the tree while what it resolves to does not (the way
    # past tarfile's own "data" filter on Python < 3.11.13), then a file written through it.
    chain: list[tarfile.TarInfo | tuple[str, str]] = [directory("d"), link("a", "d"), link("d/up", "..")]
    chain += [link("escape", "a/up/a/up"), ("escape/pwned.txt", "written outside the tree")]
    data = tar_of(chain)
    dest = tmp_path / "deep" / "dest"

    with pytest.raises(ArchiveError, match="inside a symbolic link of the archive"):
        inspect(io.BytesIO(data))
    with pytest.raises(ArchiveError, match="inside a symbolic link of the archive"):
        extract(io.BytesIO(data), dest)
    assert not list(tmp_path.rglob("pwned.txt"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a/" * 40_000 + "f", "a header of"),  # 80 kB of name in a 241-byte upload
        ("a/" * 65 + "f", "nested deeper than 64"),
        ("x" * 3000, "longer than 2048 bytes"),
    ],
)
def test_an_overlong_or_overdeep_path_is_refused_before_it_costs_anything(name: str, reason: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        archive.addfile(info)

    with pytest.raises(ArchiveError, match=reason):
        inspect(io.BytesIO(buffer.getvalue()))


def test_members_with_huge_pax_headers_are_refused_at_the_first(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for i in range(50):
            info = tarfile.TarInfo(f"f{i}")
            info.pax_headers = {"comment": "x" * 1_000_000}
            archive.addfile(info)
    compressed = gzip.compress(raw.getvalue())
    data = Counting(compressed)

    with pytest.raises(ArchiveError, match="a header of"):
        inspect(data)
    assert data.bytes_read < len(compressed) / 4  # the first header stopped it (gzip reads 8 KiB at a time)
