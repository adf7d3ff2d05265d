"""The sandboxed runner and the job log, called directly (no worker): both confinements, cleanup, limits."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest
from django.test import override_settings
from django.utils import timezone

from apps.jobs import logs
from apps.jobs.errors import PermanentError
from apps.jobs.models import Artifact, Job
from tasks.joblog import JobLog
from tasks.sandbox import MARKER_VAR, CommandTimedOut, Output, Workspace, run_command
from tasks.toolrun import ToolRun
from tests.tooljobs import processes_with

MODES = ["rlimit", pytest.param("bwrap", marks=pytest.mark.skipif(not shutil.which("bwrap"), reason="no bwrap"))]

DAEMONS = """
import os, subprocess, sys, time
marker = sys.argv[1]
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", marker])
    os._exit(0)
print("daemons started", flush=True)
"""


class Collect(Output):
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@pytest.fixture(params=MODES)
def workspace(request: pytest.FixtureRequest) -> Workspace:
    ws = Workspace.create()
    ws.sandbox = request.param
    yield ws
    ws.remove()


def run(workspace: Workspace, script: str, *args: str, timeout: float | None = None) -> tuple[int, str]:
    (workspace.src / "script.py").write_text(script)
    workspace.hand_over()
    out = Collect()
    code = run_command(["python", "script.py", *args], workspace, out, timeout=timeout)
    return code, out.data.decode()


def test_daemons_that_left_the_process_group_are_killed_when_the_command_exits(workspace: Workspace) -> None:
    marker = f"daemon-{uuid.uuid4().hex}"

    code, out = run(workspace, DAEMONS, marker)

    assert code == 0
    assert "daemons started" in out
    assert processes_with(marker) == []


def test_a_command_over_its_timeout_is_killed_with_everything_it_started(workspace: Workspace) -> None:
    marker = f"timeout-{uuid.uuid4().hex}"

    with pytest.raises(CommandTimedOut):
        run(workspace, DAEMONS + "import time; time.sleep(300)\n", marker, timeout=2)

    assert processes_with(marker) == []


def test_the_environment_is_scrubbed(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_TEST_SECRET", "hunter2")

    code, out = run(workspace, "import os; print(sorted(os.environ.items()))")

    assert code == 0
    assert "hunter2" not in out
    assert "DATABASE_URL" not in out


def test_resource_limits_apply(workspace: Workspace) -> None:
    with override_settings(JOB_FILE_BYTES=1024 * 1024):
        code, out = run(workspace, "open('big', 'wb').write(b'0' * 4 * 1024 * 1024)")

    assert code != 0
    assert "File too large" in out or code < 0


@pytest.mark.django_db
def test_a_long_log_is_cut_with_a_visible_marker(settings: object, django_user_model: object) -> None:
    settings.JOB_LOG_MAX_BYTES = 1000
    owner = django_user_model.objects.create_user("logger")
    job = Job.objects.create(owner=owner, kind="test", payload={}, created_at=timezone.now())
    log = JobLog(job.pk)

    for i in range(200):
        log.write(f"line {i}\n".encode())
    log.close()

    text, end = logs.read(job, 0, 1_000_000)
    assert text.startswith("line 0\nline 1\n")
    assert "line 199" not in text
    assert text.rstrip().endswith("the rest is not kept")
    assert 1000 <= end < 1200
    assert logs.read(job, 500, 1_000_000)[0] == text.encode()[500:].decode()


def test_a_program_that_is_not_installed_is_a_permanent_error(workspace: Workspace) -> None:
    with pytest.raises(PermanentError, match="'no-such-tool' is not installed"):
        run_command(["no-such-tool", "--version"], workspace, Collect())


def test_processes_left_by_a_dead_worker_process_are_reaped_when_the_next_job_starts(workspace: Workspace) -> None:
    orphan_marker, live_marker = f"orphan-{uuid.uuid4().hex}", f"live-{uuid.uuid4().hex}"
    spawn = [sys.executable, "-c", "import time; time.sleep(300)"]
    orphan = subprocess.Popen([*spawn, orphan_marker], env={MARKER_VAR: "999999999-dead"}, start_new_session=True)
    living = subprocess.Popen([*spawn, live_marker], env={MARKER_VAR: f"{os.getpid()}-alive"}, start_new_session=True)
    try:
        code, _ = run(workspace, "print('next job')")

        assert code == 0
        assert orphan.wait(5) == -9
        assert processes_with(live_marker) == [living.pid]  # its owner is alive: not ours to kill
    finally:
        living.kill()
        orphan.kill()


@pytest.mark.django_db
def test_artifacts_match_globs_skip_links_and_replace_an_earlier_attempts(django_user_model: object) -> None:
    owner = django_user_model.objects.create_user("builder")
    job = Job.objects.create(owner=owner, kind="build", payload={}, created_at=timezone.now())
    workspace = Workspace.create()
    try:
        run = ToolRun(job, lambda percent, message="": None, workspace, JobLog(job.pk))
        (workspace.src / "dist" / "sub").mkdir(parents=True)
        (workspace.src / "dist" / "old.whl").write_bytes(b"old")
        assert [a["name"] for a in run.collect_artifacts(["dist/*"])] == ["dist/old.whl"]

        (workspace.src / "dist" / "old.whl").unlink()
        (workspace.src / "dist" / "new.whl").write_bytes(b"new")
        (workspace.src / "dist" / "sub" / "deep.txt").write_bytes(b"deep")
        (workspace.src / "dist" / "passwd").symlink_to("/etc/passwd")
        found = run.collect_artifacts(["dist/*"])

        assert [a["name"] for a in found] == ["dist/new.whl"]  # no link, no file of a subfolder
        assert list(Artifact.objects.filter(job=job).values_list("name", flat=True)) == ["dist/new.whl"]
        assert [a["name"] for a in run.collect_artifacts(["dist/**"])] == ["dist/new.whl", "dist/sub/deep.txt"]
    finally:
        workspace.remove()
