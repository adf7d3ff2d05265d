"""The sandboxed runner, called directly (no worker), in both confinements: cleanup, the per-job
limits (each ending its own job while a job beside it finishes), the job's own uid, and what a job
leaves behind in a slot when its worker process dies."""

import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from django.test import override_settings

from tasks.context import PermanentError, RetryableError
from tasks.sandbox import confinement, processes
from tasks.sandbox.processes import MARKER_VAR
from tasks.sandbox.runner import CommandTimedOut, LimitExceeded, Output, run_command
from tasks.sandbox.workspace import SandboxUnavailable, Workspace
from tests.conftest import require_bwrap
from tests.tooljobs import processes_with

MODES = ["rlimit", "bwrap"]
WORKER_FILE = str(Path(__file__).resolve().parent.parent / "project" / "settings.py")

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
def mode(request: pytest.FixtureRequest) -> str:
    require_bwrap(request.param)
    return request.param


@pytest.fixture
def workspace(mode: str) -> Workspace:
    ws = Workspace.create(sandbox=mode)
    yield ws
    ws.remove()


def run(workspace: Workspace, script: str, *args: str, timeout: float | None = None) -> tuple[int, str]:
    (workspace.src / "script.py").write_text(script)
    workspace.hand_over()
    out = Collect()
    code = run_command(["python", "script.py", *args], workspace, out, timeout=timeout)
    return code, out.data.decode(errors="replace")


def test_daemons_that_left_the_process_group_are_killed_when_the_command_exits(workspace: Workspace) -> None:
    marker = f"daemon-{uuid.uuid4().hex}"

    code, out = run(workspace, DAEMONS, marker)

    assert code == 0
    assert "daemons started" in out
    assert processes_with(marker) == []


def test_a_command_over_its_timeout_is_killed_with_everything_it_started(workspace: Workspace) -> None:
    marker = f"timeout-{uuid.uuid4().hex}"
    (workspace.src / "script.py").write_text(DAEMONS + "import time; time.sleep(300)\n")
    workspace.hand_over()
    out = Collect()

    with pytest.raises(CommandTimedOut):
        run_command(["python", "script.py", marker], workspace, out, timeout=2)

    assert "daemons started" in out.data.decode()  # there was something to kill
    assert processes_with(marker) == []


def test_the_environment_is_scrubbed(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_TEST_SECRET", "hunter2")

    code, out = run(workspace, "import os; print(sorted(os.environ.items()))")

    assert code == 0
    assert "hunter2" not in out
    assert "DATABASE_URL" not in out


def test_the_job_runs_as_a_uid_of_its_own_and_two_jobs_at_once_have_two(mode: str) -> None:
    first, second = Workspace.create(sandbox=mode), Workspace.create(sandbox=mode)
    try:
        uids = [
            run(ws, "import os; print(os.getuid(), os.geteuid(), os.getgroups())")[1].split()[:2]
            for ws in (first, second)
        ]
    finally:
        first.remove()
        second.remove()

    assert uids[0][0] == uids[0][1] != "0"
    assert uids[1][0] == uids[1][1] != "0"
    assert uids[0] != uids[1]


def test_in_bwrap_the_job_sees_only_its_own_processes_and_no_worker_files() -> None:
    require_bwrap("bwrap")
    ws = Workspace.create(sandbox="bwrap")
    try:
        code, out = run(
            ws,
            "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()));"
            f"print([os.path.exists(p) for p in {[str(ws.root.parent), '/root', '/etc/shadow', WORKER_FILE]!r}])",
        )
    finally:
        ws.remove()

    assert code == 0, out
    pids, seen = out.splitlines()[:2]
    assert len(eval(pids)) <= 3  # noqa: S307 (our own output): bwrap's init, python, nothing of the host
    assert seen == "[False, False, False, False]"


def test_a_program_that_is_not_installed_is_a_permanent_error(workspace: Workspace) -> None:
    with pytest.raises(PermanentError, match="'no-such-tool' is not installed"):
        run_command(["no-such-tool", "--version"], workspace, Collect())


# --- Limits: each ends its own job, named; a job beside it finishes normally ---------------------

HOGS = {
    "memory": ("b = bytearray(1024 * 1024 * 1024); print('allocated', len(b))", "JOB_MEMORY_BYTES"),
    "processes": (
        "import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(60)\n"
        "            os._exit(0)\n    except OSError:\n        time.sleep(0.01)\n",
        "JOB_MAX_PROCESSES",
    ),
    "disk": ("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n", "JOB_DISK_BYTES"),
    "tmp": (
        "import tempfile\nf = open(tempfile.gettempdir() + '/big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))\n",
        "JOB_DISK_BYTES",
    ),
    "files": (
        "import os\nos.mkdir('many')\nfor i in range(100000):\n    open(f'many/{i}', 'w').close()\n",
        "JOB_MAX_FILES",
    ),
}


@pytest.mark.parametrize("hog", sorted(HOGS))
def test_a_job_over_a_limit_fails_naming_it_while_a_job_beside_it_finishes(mode: str, hog: str) -> None:
    script, setting = HOGS[hog]
    with override_settings(
        JOB_MEMORY_BYTES=256 * 1024**2, JOB_MAX_PROCESSES=40, JOB_DISK_BYTES=64 * 1024**2, JOB_MAX_FILES=3000
    ):
        hog_ws, quiet_ws = Workspace.create(sandbox=mode), Workspace.create(sandbox=mode)
    quiet: dict[str, object] = {}

    def beside() -> None:
        quiet["result"] = run(quiet_ws, "import time; time.sleep(2); print('quiet job done')")

    thread = threading.Thread(target=beside)
    try:
        thread.start()
        with pytest.raises(LimitExceeded) as raised:
            run(hog_ws, script, timeout=60)
        thread.join(30)
    finally:
        hog_ws.remove()
        quiet_ws.remove()

    assert setting in str(raised.value)
    assert quiet["result"] == (0, "quiet job done\n")


def test_the_limits_are_per_job_not_per_process() -> None:
    """Two processes of 150 MiB each are within a per-process limit of 256 MiB, not a job's."""
    two = (
        "import subprocess, sys\ncode = 'b = bytearray(150 * 1024 * 1024); import time; time.sleep(1)'\n"
        "procs = [subprocess.Popen([sys.executable, '-c', code]) for _ in range(2)]\n"
        "print([p.wait() for p in procs])\n"
    )
    if not confinement.capabilities().cgroups:
        pytest.fail("this host has no job cgroups; the per-job memory limit cannot be tested")
    with override_settings(JOB_MEMORY_BYTES=256 * 1024**2):
        ws = Workspace.create(sandbox="rlimit")
    try:
        with pytest.raises(LimitExceeded, match="JOB_MEMORY_BYTES"):
            run(ws, two, timeout=60)
    finally:
        ws.remove()


# --- What a killed worker leaves in a slot ---------------------------------------------------------


def test_what_a_killedshared_worker_left_in_its_slot_is_cleared_by_the_next_job() -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker process that starts a job's daemon and dies without cleaning up
        try:
            ws = Workspace.create(sandbox="rlimit")
            daemon = subprocess.Popen(
                [*_as_job(ws), sys.executable, "-c", "import time; time.sleep(300)"],
                start_new_session=True,
                cwd=ws.src,
            )
            os.write(write, f"{daemon.pid} {ws.root}\n".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        pid, root = f.read().split()
    os.waitpid(child, 0)
    assert processes.pid_alive(int(pid))
    assert Path(root).is_dir()

    ws = Workspace.create(sandbox="rlimit")  # the slot is free again: its lock died with the process
    ws.remove()

    assert not processes.pid_alive(int(pid)) or _is_zombie(int(pid))
    assert not Path(root).exists()


def _as_job(ws: Workspace) -> list[str]:
    from tasks.sandbox.runner import confined_argv

    return confined_argv([], ws, {})[0]


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


# --- Markers (only where neither a cgroup nor a uid of its own finds a job's processes) ----------


def test_malformed_and_foreign_markers_are_ignored_and_orphans_are_reaped() -> None:
    spawn = [sys.executable, "-c", "import time; time.sleep(300)"]
    tags = {name: f"{name}-{uuid.uuid4().hex}" for name in ("bad", "worse", "orphan", "alive")}
    environments = {
        "bad": "x",
        "worse": "12-zz",
        "orphan": f"999999999-{uuid.uuid4().hex}",
        "alive": f"{os.getpid()}-{uuid.uuid4().hex}",
    }
    started = {
        name: subprocess.Popen([*spawn, tags[name]], env={MARKER_VAR: environments[name]}, start_new_session=True)
        for name in tags
    }
    try:
        processes.reap_orphans()  # what a job start does: must not raise on what another job wrote

        assert started["orphan"].wait(5) == -9
        for name in ("bad", "worse", "alive"):
            assert processes_with(tags[name]) == [started[name].pid]
    finally:
        for proc in started.values():
            proc.kill()
            proc.wait()


# --- Fail closed -------------------------------------------------------------------------------


def test_without_bwrap_auto_mode_refuses_to_run_tool_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(confinement.shutil, "which", lambda name, **kw: None if name == "bwrap" else real_which(name))
    confinement.capabilities.cache_clear()
    try:
        caps = confinement.capabilities()
        with pytest.raises(SandboxUnavailable, match=r"bwrap .* not installed"):
            Workspace.create()
        with override_settings(JOB_SANDBOX="rlimit"):
            confinement.capabilities.cache_clear()
            unconfined = confinement.capabilities()
    finally:
        confinement.capabilities.cache_clear()

    assert caps.sandbox is None
    assert "JOB_SANDBOX=rlimit" in caps.problem
    assert unconfined.sandbox == "rlimit"
    assert "UNCONFINED" in unconfined.describe()


# --- What one job leaves must not reach the next in its slot, nor outlive a cancel -----------------

KEYCTL_CALLS = {"x86_64": (248, 249), "aarch64": (217, 218)}  # add_key, request_key


@pytest.mark.parametrize("mode", MODES)
def test_a_key_a_job_left_in_its_users_keyring_is_gone_for_the_next_job(mode: str) -> None:
    require_bwrap(mode)
    add_key, request_key = KEYCTL_CALLS[os.uname().machine]
    script = (
        "import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"if sys.argv[1] == 'add':\n    print(libc.syscall({add_key}, b'user', b'conveyor-leak', b'secret', 6, -4))\n"
        f"else:\n    print(libc.syscall({request_key}, b'user', b'conveyor-leak', None, 0))\n"
    )
    first = Workspace.create(sandbox=mode)
    slot = first.slot.number
    try:
        assert int(run(first, script, "add")[1]) > 0  # a key id
    finally:
        first.remove()
    second = Workspace.create(sandbox=mode)
    try:
        assert second.slot.number == slot
        assert int(run(second, script, "find")[1]) == -1  # not found
    finally:
        second.remove()


def test_what_a_job_leaves_in_the_shared_tmp_in_rlimit_mode_is_removed() -> None:
    ws = Workspace.create(sandbox="rlimit")
    uid = ws.uid
    try:
        code, _ = run(
            ws, "import tempfile, os\nopen('/tmp/conveyor-left-behind', 'w').write('x')\nos.mkdir('/dev/shm/cv-left')"
        )
    finally:
        ws.remove()

    assert code == 0
    assert not os.path.exists("/tmp/conveyor-left-behind")
    assert not os.path.exists("/dev/shm/cv-left")
    assert uid not in {os.lstat(entry.path).st_uid for entry in os.scandir("/tmp")}


def test_a_cancel_during_cleanup_waits_until_the_disk_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import interrupts
    from tasks.context import JobInterrupted
    from tasks.sandbox import workspace as workspace_module

    real_remove = workspace_module.remove_disk

    def cancelled_midway(root: Path, image: Path) -> None:
        interrupts.interrupt("cancelled")  # what SIGTERM's handler does, in the middle of the unmount
        real_remove(root, image)

    monkeypatch.setattr(workspace_module, "remove_disk", cancelled_midway)
    ws = Workspace.create(sandbox="rlimit")

    with pytest.raises(JobInterrupted, match="cancelled"):
        ws.remove()

    assert not ws.root.exists()
    assert not confinement.is_mount(ws.root)


def test_a_worker_starting_clears_the_slots_a_dead_one_left() -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(write, str(Workspace.create(sandbox="rlimit").root).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        root = Path(f.read())
    os.waitpid(child, 0)
    assert confinement.is_mount(root)

    assert confinement.sweep_slots(confinement.capabilities()) >= 1

    assert not root.exists()


def test_a_host_without_room_for_the_jobs_disk_is_a_passing_failure(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], check=True)
    try:
        with (
            override_settings(JOB_WORK_ROOT=str(small), JOB_DISK_BYTES=64 * 1024**2),
            pytest.raises(RetryableError, match="no room on this worker host for the job's disk"),
        ):
            Workspace.create(sandbox="rlimit")
        assert [p.name for p in (small / "conveyor-jobs-0").iterdir()] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
