"""What the platform reads after a job's command ran (artifacts, the JUnit and ruff reports) is read
as the job left it, without following links out of the tree: in both confinements."""

import os
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from apps.jobs.models import Artifact, Job, LogChunk
from tasks.context import Context
from tasks.kinds.test import read_junit
from tasks.kinds.tool import ToolRun, tool_run
from tasks.sandbox import confinement
from tasks.sandbox.runner import run_command
from tasks.sandbox.workspace import Workspace
from tests.conftest import require_bwrap
from tests.factories import make_job, make_user
from tests.test_sandbox import Collect

pytestmark = pytest.mark.django_db

# Made inside the sandbox, as the job's user.
LEAVE_BEHIND = """
import os
os.makedirs("dist/sub", exist_ok=True)
open("dist/ok.whl", "wb").write(b"a wheel")
open("dist/sub/deep.txt", "wb").write(b"deep")
open("dist/big.bin", "wb").write(b"0" * 5000)
for name, target in {
    "dist/shadow": "/etc/shadow",
    "dist/cwd": "/proc/self/cwd",
    "dist/settings.py": "/proc/self/cwd/project/settings.py",
    "dist/environ": "/proc/self/environ",
    "dist/up": "../../../../../../../etc/passwd",
    "dist/linked-dir": "/etc",
}.items():
    os.symlink(target, name)
os.mkfifo("dist/fifo")
print("left behind")
"""


@pytest.fixture(params=["rlimit", "bwrap"])
def run(request: pytest.FixtureRequest, db: None) -> ToolRun:
    require_bwrap(request.param)
    job = make_job(make_user(f"collector-{request.param}"), Job.Status.RUNNING, kind="build")
    workspace = Workspace.create(sandbox=request.param)
    ctx = context(job)
    yield ToolRun(ctx, workspace, ctx.output)
    ctx.close()
    workspace.remove()


def context(job: Job) -> Context:
    return Context(job, lambda percent, message="": None, time.monotonic() + 60)


def in_sandbox(run: ToolRun, script: str) -> str:
    (run.workspace.src / "script.py").write_text(script)
    run.workspace.hand_over()
    out = Collect()
    assert run_command(["python", "script.py"], run.workspace, out) == 0, out.data
    return out.data.decode()


def logged(run: ToolRun) -> str:
    run.log.close()
    return "".join(Job.objects.get(pk=run.ctx.job.id).log_chunks.order_by("offset").values_list("text", flat=True))


def test_only_regular_files_of_the_tree_within_the_limits_are_collected(run: ToolRun) -> None:
    assert "left behind" in in_sandbox(run, LEAVE_BEHIND)
    # A hard link to a file the job could not write (the sandbox's passwd, the platform's, on the same
    # file system), as a job sharing the worker's uid could make one.
    os.link(run.workspace.root / "passwd", run.workspace.src / "dist" / "hard")

    with override_settings(JOB_ARTIFACTS_MAX_BYTES=1000):
        found = run.collect_artifacts(["dist/**"])

    assert [a["name"] for a in found] == ["dist/ok.whl", "dist/sub/deep.txt"]
    assert Artifact.objects.get(job=run.ctx.job.id, name="dist/ok.whl").file.read() == b"a wheel"
    log = logged(run)
    for name in ("dist/shadow", "dist/cwd", "dist/settings.py", "dist/environ", "dist/up", "dist/linked-dir"):
        assert f"not collected: {name} is a symbolic link" in log
    assert "not collected: dist/fifo is not a regular file" in log
    assert "not collected: dist/hard has other hard links" in log
    assert "not collected: dist/big.bin is larger than the limit of 1000 bytes" in log
    assert "root:" not in log


def test_a_tree_replaced_by_a_link_is_not_walked(run: ToolRun) -> None:
    # What a job that shares the worker's uid could do to its own working directory.
    src = run.workspace.src
    src.rename(src.with_name("src.x"))
    src.symlink_to("/etc")

    found = run.collect_artifacts(["shadow", "passwd", "**"])

    assert found == []
    assert "nothing collected: src is not a directory of the job's tree" in logged(run)
    assert not Artifact.objects.filter(job=run.ctx.job.id).exists()


def test_the_working_directory_cannot_be_swapped_by_the_job(run: ToolRun) -> None:
    out = in_sandbox(
        run,
        "import os\ntry:\n    os.rename(os.getcwd(), os.getcwd() + '.x')\n    print('swapped')\n"
        "except OSError as exc:\n    print('refused', exc.strerror)\n",
    )

    assert "refused Permission denied" in out
    assert run.workspace.src.is_dir()
    assert not run.workspace.src.is_symlink()


def test_reports_that_are_links_are_not_read(run: ToolRun, tmp_path: Path) -> None:
    outside = tmp_path / "junit.xml"
    outside.write_text('<testsuite tests="99" failures="0" errors="0" skipped="0" time="1"></testsuite>')
    os.symlink(outside, run.workspace.out / "junit.xml")
    os.symlink("/etc/passwd", run.workspace.out / "ruff.json")

    assert run.read_report("out/junit.xml", 1 << 20) is None
    assert run.read_report("out/ruff.json", 1 << 20) is None
    assert run.read_report("out/missing.json", 1 << 20) is None

    log = logged(run)
    assert "not read: out/junit.xml was not read (a symbolic link" in log
    assert "not read: out/ruff.json was not read (a symbolic link" in log
    assert "missing" not in log


def test_artifacts_match_globs_skip_links_and_replace_an_earlier_attempts(run: ToolRun) -> None:
    src = run.workspace.src
    (src / "dist" / "sub").mkdir(parents=True)
    (src / "dist" / "old.whl").write_bytes(b"old")
    assert [a["name"] for a in run.collect_artifacts(["dist/*"])] == ["dist/old.whl"]

    (src / "dist" / "old.whl").unlink()
    (src / "dist" / "new.whl").write_bytes(b"new")
    (src / "dist" / "sub" / "deep.txt").write_bytes(b"deep")
    (src / "dist" / "passwd").symlink_to("/etc/passwd")
    found = run.collect_artifacts(["dist/*"])

    assert [a["name"] for a in found] == ["dist/new.whl"]  # no link, no file of a subfolder
    assert list(Artifact.objects.filter(job=run.ctx.job.id).values_list("name", flat=True)) == ["dist/new.whl"]
    assert [a["name"] for a in run.collect_artifacts(["dist/**"])] == ["dist/new.whl", "dist/sub/deep.txt"]


def test_the_unconfined_mode_says_so_on_the_jobs_first_log_line() -> None:
    source = {"files": {"a.py": ""}}
    job = make_job(make_user("unconfined"), Job.Status.RUNNING, kind="test", payload={"source": source})
    with override_settings(JOB_SANDBOX="rlimit"):
        confinement.capabilities.cache_clear()
        try:
            ctx = context(job)
            with tool_run(ctx):
                pass
            ctx.close()
        finally:
            confinement.capabilities.cache_clear()

    first = job.log_chunks.order_by("offset").first().text.splitlines()[0]
    assert "sandbox: rlimit (UNCONFINED: the command shares the worker's file system and network)" in first


def test_output_without_newlines_reaches_the_log_as_it_comes(run: ToolRun) -> None:
    for _ in range(4):
        run.log.write(b"x" * 65536)  # a quarter of a MiB without a newline

    stored = sum(len(chunk.text) for chunk in LogChunk.objects.filter(job_id=run.ctx.job.id))
    assert stored >= 128 * 1024  # not held back waiting for a newline that never comes

    for _ in range(80):
        run.log.write(b"x" * 65536)
    text = logged(run)
    assert len(text.encode()) < 1024 * 1024 + 200
    assert text.rstrip().endswith("the rest is not kept")


def test_artifacts_whose_names_the_platform_cannot_keep_are_noted_and_not_stored(run: ToolRun) -> None:
    dist = run.workspace.src / "dist"
    deep = dist / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    (deep / "long.whl").write_bytes(b"long")
    (dist / "ok.whl").write_bytes(b"ok")
    os.close(os.open(os.fsencode(dist) + b"/bad-\xff.whl", os.O_CREAT | os.O_WRONLY, 0o644))
    media_before = set(Path(settings.MEDIA_ROOT).rglob("*")) if Path(settings.MEDIA_ROOT).exists() else set()

    found = run.collect_artifacts(["dist/**"])

    assert [a["name"] for a in found] == ["dist/ok.whl"]
    log = logged(run)
    assert "(a name must be UTF-8, at most 500 long)" in log
    assert "bad-\\udcff.whl" in log  # named (escaped), not stored
    stored = {p for p in Path(settings.MEDIA_ROOT).rglob("*") if p.is_file()} - media_before
    assert [p.name for p in stored] == ["ok.whl"]  # nothing stored without its row


def test_a_report_nested_deeper_than_a_junit_report_counts_as_none() -> None:
    deep = b"<testsuites>" + b"<x>" * 5000 + b"</x>" * 5000 + b"</testsuites>"

    assert read_junit(deep)["tests"] is None
    assert read_junit(b'<testsuite tests="2" failures="1"><testcase name="a"/></testsuite>')["tests"] == 2
