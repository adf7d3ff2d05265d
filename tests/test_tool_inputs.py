"""What build/test/lint submissions and uploads refuse, with the field and the reason."""

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from rest_framework.test import APIClient

from apps.jobs.models import Job, Upload
from tasks.sandbox.unpack import extract
from tests.factories import make_upload, submit
from tests.tooljobs import sample_files, tar_gz, upload, zip_bytes

pytestmark = pytest.mark.django_db


def test_a_command_not_on_the_allow_list_is_refused(api: APIClient) -> None:
    for argv in (["bash", "-c", "id"], ["/usr/bin/python", "-V"], ["curl", "http://x"]):
        errors = submit(api, "test", {"source": {"files": {"a.py": ""}}, "command": argv}, expect=400)

        assert "not an allowed program" in errors["payload"]["command"][0]
    assert Job.objects.count() == 0


def test_an_allowed_command_is_accepted(api: APIClient) -> None:
    job = submit(api, "test", {"source": {"files": {"a.py": ""}}, "command": ["pytest", "-x", "; rm -rf /"]})

    assert job["payload"]["command"] == ["pytest", "-x", "; rm -rf /"]


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({}, None),
        ({"files": {}, "upload": "x"}, None),
        ({"files": {"../escape.py": "x"}}, "files"),
        ({"files": {"/etc/passwd": "x"}}, "files"),
        ({"files": {"a.py": 1}}, "files"),
        ({"upload": "not-a-uuid"}, "upload"),
        ({"upload": "00000000-0000-0000-0000-000000000000"}, "upload"),
        ({"git": {"url": "ssh://host/repo.git", "ref": "main"}}, "git"),
        ({"git": {"url": "https://user:token@example.com/r.git", "ref": "main"}}, "git"),
        ({"git": {"url": "https://example.com/r.git", "ref": "--upload-pack=touch /tmp/x"}}, "git"),
        ({"git": {"url": "https://example.com/r.git", "ref": "a..b"}}, "git"),
        ({"git": {"url": "file:///root/private.git", "ref": "main"}}, "git"),  # not in JOB_GIT_FILE_ROOTS
        ({"git": {"url": "file:///", "ref": "main"}}, "git"),
    ],
)
def test_a_bad_source_is_a_400_naming_what_is_wrong(api: APIClient, source: dict, field: str | None) -> None:
    body = submit(api, "test", {"source": source}, expect=400)

    errors = body["payload"]["source"]
    if field:
        assert field in errors
    assert "token" not in json.dumps(body)


def test_inline_text_that_is_not_valid_unicode_is_a_400(api: APIClient) -> None:
    body = '{"kind": "test", "payload": {"source": {"files": {"a.py": "half of a pair: \\ud800"}}}}'

    response = api.post("/api/jobs/", body, content_type="application/json")

    assert response.status_code == 400
    assert "not valid Unicode" in response.json()["payload"]["source"]["files"][0]
    assert Job.objects.count() == 0


def test_bad_env_names_and_escaping_artifact_globs_are_refused(api: APIClient) -> None:
    payload = {"source": {"files": {"a.py": ""}}, "env": {"OK": "1", "NOT OK": "2"}, "artifacts": ["../../etc/*"]}

    errors = submit(api, "build", payload, expect=400)["payload"]

    assert "NOT OK" in errors["env"][0]
    assert "'..'" in errors["artifacts"][0]


def test_another_users_upload_cannot_be_used(api: APIClient, other_user: User) -> None:
    theirs = str(make_upload(other_user).id)

    errors = submit(api, "test", {"source": {"upload": theirs}}, expect=400)

    assert errors["payload"]["source"]["upload"] == ["No such upload."]


def test_an_upload_is_stored_with_its_size_and_hash(api: APIClient) -> None:
    data = tar_gz(sample_files())

    response = upload(api, "sample.tar.gz", data)

    assert response.status_code == 201
    body = response.json()
    assert body["size"] == len(data)
    stored = Upload.objects.get(pk=body["id"])
    assert stored.files == len(sample_files())
    assert stored.file.read() == data
    assert body["sha256"] == hashlib.sha256(data).hexdigest()


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("slip.tar.gz", tar_gz({"../evil.py": "x"}), "'..'"),
        ("abs.tar.gz", tar_gz({"/etc/cron.d/evil": "x"}), "absolute"),
        ("link.tar.gz", _tar_with(_symlink("a/link", "../../etc/passwd")), "outside"),
        ("abslink.tar.gz", _tar_with(_symlink("link", "/etc/passwd")), "absolute"),
        ("slip.zip", zip_bytes({"../../evil.py": "x"}), "'..'"),
        ("abs.zip", zip_bytes({"/tmp/evil.py": "x"}), "absolute"),
        ("link.zip", _zip_symlink(), "symbolic links"),
        ("notes.txt", b"just text", "not a tar.gz or zip"),
        ("broken.tar.gz", b"\x1f\x8b" + b"\0" * 20, "unreadable"),
    ],
)
def test_an_archive_that_escapes_or_is_not_one_is_refused(api: APIClient, name: str, data: bytes, reason: str) -> None:
    response = upload(api, name, data)

    assert response.status_code == 400
    assert reason in response.json()["file"][0]
    assert Upload.objects.count() == 0


def test_a_link_that_stays_inside_the_tree_is_accepted(api: APIClient) -> None:
    response = upload(api, "ok.tar.gz", _tar_with(_symlink("a/b/link", "../c.py")))

    assert response.status_code == 201


def test_an_upload_over_the_limits_is_refused(api: APIClient) -> None:
    with override_settings(UPLOAD_MAX_BYTES=100):
        assert upload(api, "big.tar.gz", tar_gz({"a.py": "x" * 10_000}) + b"\0" * 200).status_code == 413
    with override_settings(JOB_SOURCE_MAX_FILES=2):
        response = upload(api, "many.zip", zip_bytes({f"{i}.py": "" for i in range(3)}))
        assert response.status_code == 400
        assert "more than 2 files" in response.json()["file"][0]
    with override_settings(JOB_SOURCE_MAX_BYTES=1000):
        response = upload(api, "bomb.tar.gz", tar_gz({"a.txt": "0" * 5000}))
        assert response.status_code == 400
        assert "unpacked" in response.json()["file"][0]


def test_an_upload_without_a_file_is_a_400(api: APIClient) -> None:
    response = api.post("/api/uploads/", {}, format="multipart")

    assert response.status_code == 400
    assert "file" in response.json()


def test_uploads_need_a_token() -> None:
    assert APIClient().post("/api/uploads/", {}, format="multipart").status_code == 401


# --- archives as people make them ---------------------------------------------------------------------


def _tar_of_directory(tmp_path: Path) -> bytes:
    """What `tar czf src.tgz -C project .` writes: `./`, `./pkg/`, `./pkg/x.py`."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "x.py").write_text("x = 1\n")
    (project / "README").write_text("hello\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(project, arcname=".")
    return buffer.getvalue()


def _git_archive(tmp_path: Path) -> bytes:
    """`git archive --format=tar.gz --prefix=project-1.0/` of a two-file repository."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "x.py").write_text("x = 1\n")
    (repo / "README").write_text("hello\n")
    git = ["git", "-C", str(repo), "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    archive = [*git, "archive", "--format=tar.gz", "--prefix=project-1.0/", "HEAD"]
    return subprocess.run(archive, check=True, capture_output=True).stdout


def _hard_linked() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.addfile(_directory("project-1.0"))
        a = tarfile.TarInfo("project-1.0/README")
        a.size = len(b"hello\n")
        archive.addfile(a, io.BytesIO(b"hello\n"))
        archive.addfile(_link("project-1.0/pkg/x.py", "project-1.0/README", tarfile.LNKTYPE))
    return buffer.getvalue()


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


TWO_FILES = {"README": "hello\n", "pkg/x.py": "x = 1\n"}


@pytest.mark.parametrize(
    ("name", "make", "tree"),
    [
        ("dot.tar.gz", _tar_of_directory, TWO_FILES),
        ("git.tar.gz", _git_archive, TWO_FILES),
        ("prefixed.tar.gz", lambda _: tar_gz({f"project-1.0/{k}": v for k, v in TWO_FILES.items()}), TWO_FILES),
        (
            "prefixed.zip",
            lambda _: zip_bytes({"project-1.0/": "", **{f"project-1.0/{k}": v for k, v in TWO_FILES.items()}}),
            TWO_FILES,
        ),
        ("dot.zip", lambda _: zip_bytes({"./": "", **{f"./{k}": v for k, v in TWO_FILES.items()}}), TWO_FILES),
        ("two.tar.gz", lambda _: tar_gz({"a/x.py": "x", "b/y.py": "y"}), {"a/x.py": "x", "b/y.py": "y"}),
        ("two.zip", lambda _: zip_bytes({"a/x.py": "x", "b/y.py": "y"}), {"a/x.py": "x", "b/y.py": "y"}),
        ("linked.tar.gz", lambda _: _hard_linked(), {"README": "hello\n", "pkg/x.py": "hello\n"}),
    ],
)
def test_an_archive_as_people_make_it_is_accepted_and_counts_what_unpacks(
    api: APIClient, tmp_path: Path, name: str, make: Callable[[Path], bytes], tree: dict[str, str]
) -> None:
    response = upload(api, name, make(tmp_path))

    assert response.status_code == 201, response.content
    stored = Upload.objects.get(pk=response.json()["id"])
    dest = tmp_path / "src"
    dest.mkdir()
    with stored.file.open("rb") as f:
        extract(f, dest)
    unpacked = {p.relative_to(dest).as_posix(): p.read_text() for p in dest.rglob("*") if not p.is_dir()}
    assert unpacked == tree
    assert stored.files == len(unpacked)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (tar_gz({"project/ok.py": "x", "project/../../x": "x"}), "'..'"),
        (_tar_with(_symlink("project/a", "../../etc/passwd")), "outside"),
        # inside the tree as archived (project/x), outside it once the single folder project/ is stripped
        (_tar_with(_symlink("project/a/b", "../../x")), "outside"),
        (zip_bytes({"project/ok.py": "x", "project/../../x": "x"}), "'..'"),
    ],
)
def test_an_escape_under_a_single_top_level_folder_is_still_refused(api: APIClient, data: bytes, reason: str) -> None:
    response = upload(api, "escape.tar.gz", data)

    assert response.status_code == 400
    assert reason in response.json()["file"][0]
    assert Upload.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("files.tar.gz", lambda: tar_gz({f"f{i}": "" for i in range(5_000)}), "more than 100 files"),
        ("dirs.tar.gz", lambda: _tar_with_all([_directory(f"d{i}") for i in range(5_000)]), "more than 200 entries"),
        ("files.zip", lambda: zip_bytes({f"f{i}": "" for i in range(5_000)}), "more than 200 entries"),
        ("dirs.zip", lambda: zip_bytes({f"d{i}/": "" for i in range(5_000)}), "more than 200 entries"),
    ],
)
def test_an_archive_with_too_many_members_is_refused(
    api: APIClient, name: str, make: Callable[[], bytes], reason: str
) -> None:
    data = make()

    with override_settings(JOB_SOURCE_MAX_FILES=100):
        response = upload(api, name, data)

    assert response.status_code == 400
    assert reason in response.json()["file"][0]
    assert Upload.objects.count() == 0


def _tar_with_all(members: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in members:
            archive.addfile(member)
    return buffer.getvalue()
