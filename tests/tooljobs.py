"""Helpers for build/test/lint tests: the sample project in each source form, and direct tool runs."""

import io
import json
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

from django.conf import settings
from rest_framework.test import APIClient

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "sample"
TOOLCHAIN_PYTHON = str(settings.JOB_TOOLCHAIN / "bin" / "python")


def sample_files() -> dict[str, str]:
    return {
        path.relative_to(SAMPLE).as_posix(): path.read_text()
        for path in sorted(SAMPLE.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def tar_gz(members: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def git_repo(path: Path) -> str:
    """The sample project committed in a git repository at `path`, tagged v1; its file:// URL."""
    shutil.copytree(SAMPLE, path, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(path), "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "sample"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    return f"file://{path}"


def upload(api: APIClient, name: str, data: bytes) -> object:
    """POST `data` to the upload endpoint (the uploads a test only needs: `tests.factories.make_upload`)."""
    return api.post("/api/uploads/", {"file": _named(name, data)}, format="multipart")


def _named(name: str, data: bytes) -> io.BytesIO:
    f = io.BytesIO(data)
    f.name = name
    return f


def pytest_directly(tmp_path: Path) -> dict[str, int]:
    """Run the toolchain's pytest on a copy of the sample; its own summary line as counts."""
    tree = tmp_path / "direct"
    shutil.copytree(SAMPLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [TOOLCHAIN_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tree,
        capture_output=True,
        text=True,
    ).stdout
    summary = out.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    return {
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "errors": counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
    }


def ruff_directly(tmp_path: Path) -> list[dict]:
    tree = tmp_path / "direct-ruff"
    shutil.copytree(SAMPLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    ruff = str(settings.JOB_TOOLCHAIN / "bin" / "ruff")
    out = subprocess.run(
        [ruff, "check", "--no-cache", "--output-format", "json"], cwd=tree, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def full_log(api: APIClient, job_id: str) -> str:
    text, offset = "", 0
    while True:
        body = api.get(f"/api/jobs/{job_id}/log/", {"offset": offset}).json()
        text += body["text"]
        if body["offset"] == offset:
            return text
        offset = body["offset"]


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if marker.encode() in (pid / "cmdline").read_bytes():
                found.append(int(pid.name))
        except OSError:
            continue
    return found
