"""Build, test and lint jobs through a real worker: real pytest, ruff and build, in the sandbox."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apps.jobs.models import Job
from tests.conftest import WorkerProcess, sse_events, wait_final, wait_for
from tests.factories import make_upload, submit
from tests.git_https import GitServer
from tests.tooljobs import (
    TOOLCHAIN_PYTHON,
    full_log,
    git_repo,
    processes_with,
    pytest_directly,
    ruff_directly,
    sample_files,
    zip_bytes,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def source(request: pytest.FixtureRequest, user: User, tmp_path: Path, git_server: GitServer) -> dict:
    form = request.param
    if form == "files":
        return {"files": sample_files()}
    if form == "upload":
        return {"upload": str(make_upload(user).id)}  # the sample project as a tar.gz
    if form == "https":
        return {"git": {"url": f"https://127.0.0.1:{git_server.port}/sample.git", "ref": "v1"}}
    return {"git": {"url": git_repo(tmp_path / "repo"), "ref": "v1"}}


@pytest.mark.parametrize("source", ["files", "upload", "git", "https"], indirect=True)
def test_a_test_job_counts_what_pytest_itself_counts(
    worker: WorkerProcess, api: APIClient, source: dict, tmp_path: Path
) -> None:
    expected = pytest_directly(tmp_path)

    job = wait_final(submit(api, "test", {"source": source})["id"], timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    result = job.result
    assert {k: result[k] for k in expected} == expected == {"passed": 3, "failed": 1, "errors": 1, "skipped": 1}
    assert result["tests"] == 6
    assert result["outcome"] == "failed"
    assert result["exit_code"] == 1
    failures = {f["test"]: f["message"] for f in result["failures"]}
    assert set(failures) == {
        "tests/test_sample.py::test_add_is_wrong_on_purpose",
        "tests/test_sample.py::test_with_a_broken_fixture",
    }
    assert "4 == 5" in failures["tests/test_sample.py::test_add_is_wrong_on_purpose"]
    assert job.attempts == 1  # failing tests are an outcome, never retried
    log = full_log(api, str(job.id))
    assert "$ python -m pytest" in log
    assert "1 failed, 3 passed, 1 skipped, 1 error" in log


def test_a_lint_job_counts_what_ruff_itself_counts(
    worker: WorkerProcess, api: APIClient, user: User, tmp_path: Path
) -> None:
    expected = ruff_directly(tmp_path)
    archive = make_upload(user, zip_bytes(sample_files()), "sample.zip")

    job = wait_final(submit(api, "lint", {"source": {"upload": str(archive.id)}})["id"], timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.result["count"] == len(expected) == 3
    assert job.result["outcome"] == "issues"
    assert job.result["by_code"] == {"F401": 2, "F841": 1}
    assert {(d["path"], d["line"], d["code"]) for d in job.result["diagnostics"]} == {
        ("sample/__init__.py", e["location"]["row"], e["code"]) for e in expected
    }


def test_a_clean_tree_lints_clean(worker: WorkerProcess, api: APIClient) -> None:
    job = wait_final(submit(api, "lint", {"source": {"files": {"ok.py": "print('fine')\n"}}})["id"], timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.result["outcome"] == "clean"
    assert job.result["count"] == 0


def test_a_build_job_makes_a_wheel_that_pip_installs(
    worker: WorkerProcess, api: APIClient, other_api: APIClient, tmp_path: Path
) -> None:
    job = wait_final(submit(api, "build", {"source": {"files": sample_files()}})["id"], timeout=90)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.result["outcome"] == "passed"
    names = sorted(a["name"] for a in job.result["artifacts"])
    assert names == ["dist/conveyor_sample-0.1.0-py3-none-any.whl", "dist/conveyor_sample-0.1.0.tar.gz"]
    wheel = next(a for a in job.result["artifacts"] if a["name"].endswith(".whl"))
    response = api.get(wheel["url"])
    assert response.status_code == 200
    data = b"".join(response.streaming_content)
    assert len(data) == wheel["size"]
    path = tmp_path / wheel["name"].rsplit("/", 1)[-1]
    path.write_bytes(data)
    target = tmp_path / "site"
    subprocess.run(
        [TOOLCHAIN_PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(path)],
        check=True,
    )
    out = subprocess.run(
        [sys.executable, "-c", "import sample; print(sample.add(20, 22))"],
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"
    assert other_api.get(wheel["url"]).status_code == 404


def test_a_missing_git_ref_fails_at_once_with_a_readable_message(
    worker: WorkerProcess, api: APIClient, tmp_path: Path
) -> None:
    url = git_repo(tmp_path / "repo")

    job = wait_final(submit(api, "test", {"source": {"git": {"url": url, "ref": "no-such-branch"}}})["id"], timeout=60)

    assert job.status == Job.Status.FAILED
    assert job.attempts == 1
    assert job.error["type"] == "PermanentError"
    assert "no-such-branch" in job.error["message"]


SNOOP = """
import os, socket, sys
print("ENV", sorted(os.environ))
for path in sys.argv[1:]:
    print("READ", path, os.path.exists(path))
try:
    socket.create_connection(("127.0.0.1", int(os.environ["REDIS_PORT"])), timeout=2)
    print("NETWORK open")
except OSError as exc:
    print("NETWORK closed", exc)
"""


def test_a_job_sees_nothing_of_the_worker_environment_and_no_network(
    worker: WorkerProcess, api: APIClient, process_env: dict, tmp_path: Path
) -> None:
    redis_port = process_env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0]
    settings_file = str(Path(__file__).resolve().parent.parent / "project" / "settings.py")
    secret_file = tmp_path / "secret.env"
    secret_file.write_text("TOKEN=do-not-read")

    payload = {
        "source": {"files": {"snoop.py": SNOOP}},
        "command": ["python", "snoop.py", settings_file, str(secret_file)],
        "env": {"REDIS_PORT": redis_port},
    }
    job_id = submit(api, "test", payload)["id"]
    job = wait_final(job_id, timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    log = full_log(api, job_id)
    env_line = next(line for line in log.splitlines() if line.startswith("ENV"))
    for secret in ("DATABASE_URL", "SECRET_KEY", "REDIS_URL", "DJANGO_SETTINGS_MODULE"):
        assert secret not in env_line
    assert process_env["DATABASE_URL"] not in log
    assert "NETWORK closed" in log
    assert f"READ {settings_file} False" in log
    assert f"READ {secret_file} False" in log


def test_arguments_stay_literal(worker: WorkerProcess, api: APIClient, tmp_path: Path) -> None:
    witness = tmp_path / "touched"
    args = [f"; touch {witness}", "$(id)", "`id`", "&& echo hi", "*"]

    payload = {"source": {"files": {"a.py": "import sys; print(sys.argv[1:])"}}, "command": ["python", "a.py", *args]}
    job_id = submit(api, "test", payload)["id"]
    job = wait_final(job_id, timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert repr(args) in full_log(api, job_id)
    assert not witness.exists()


LINGER = """
import subprocess, sys, time
marker = sys.argv[1]
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])
# In a session of its own (setsid before exec), out of the job's process group.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker], start_new_session=True)
print("started", flush=True)
time.sleep(300)
"""


def test_cancelling_a_job_leaves_no_process_behind(worker: WorkerProcess, api: APIClient) -> None:
    marker = f"linger-{uuid.uuid4().hex}"
    payload = {"source": {"files": {"linger.py": LINGER}}, "command": ["python", "linger.py", marker]}
    job_id = submit(api, "test", payload)["id"]
    wait_for(lambda: "started" in full_log(api, job_id), timeout=30, what="the job to start its children")
    assert len(processes_with(marker)) >= 3

    assert api.post(f"/api/jobs/{job_id}/cancel/").status_code == 200

    assert wait_final(job_id).status == Job.Status.CANCELLED
    wait_for(lambda: not processes_with(marker), timeout=10, what="every process of the job to be gone")


def test_a_job_over_its_timeout_is_timed_out_with_its_log_kept_and_nothing_left(
    worker: WorkerProcess, api: APIClient
) -> None:
    marker = f"linger-{uuid.uuid4().hex}"
    payload = {"source": {"files": {"linger.py": LINGER}}, "command": ["python", "linger.py", marker]}
    job_id = submit(api, "test", payload, timeout_seconds=3)["id"]

    job = wait_final(job_id, timeout=30)

    assert job.status == Job.Status.TIMED_OUT
    assert "started" in full_log(api, job_id)
    wait_for(lambda: not processes_with(marker), timeout=10, what="every process of the job to be gone")


def test_the_log_streams_live_over_server_sent_events(worker: WorkerProcess, api: APIClient) -> None:
    script = "import time\nfor i in range(3):\n    print('line', i)\n    time.sleep(0.3)\n"
    job_id = submit(api, "test", {"source": {"files": {"s.py": script}}, "command": ["python", "s.py"]})["id"]

    response = api.get(f"/api/jobs/{job_id}/stream/", HTTP_ACCEPT="text/event-stream")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    events = sse_events(b"".join(response).decode())  # an async stream, consumed here
    names = [event for event, _ in events]
    assert names[0] == "status"
    assert names[-1] == "end"
    assert events[-1][1]["status"] == "succeeded"
    log = "".join(data["text"] for event, data in events if event == "log")
    assert log.index("line 0") < log.index("line 1") < log.index("line 2")
    assert "progress" in names


def test_a_git_host_that_does_not_answer_is_retried_then_fails(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "test", {"source": {"git": {"url": "https://127.0.0.1:9/nothing.git", "ref": "main"}}})["id"]

    job = wait_final(job_id, timeout=60)

    assert job.status == Job.Status.FAILED
    assert job.attempts == 2  # retried: a host that is down may come back
    assert job.error["type"] == "RetryableError"
    assert job.error["message"] == (
        "git: fetching 'main' from https://127.0.0.1:9/nothing.git failed: 127.0.0.1:9: could not connect "
        "(gave up after 2 attempts)"
    )
    assert "retrying" in Job.objects.get(pk=job_id).events.values_list("type", flat=True)


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:{port}/sample.git",  # a name for 127.0.0.1 that is not allowed by name
        "https://2130706434:{port}/sample.git",  # 127.0.0.2 in other spellings (127.0.0.1 is allowed)
        "https://0x7f000002:{port}/sample.git",
        "https://[::ffff:127.0.0.2]:{port}/sample.git",
        "https://169.254.169.254/latest/meta-data.git",
        "https://10.1.2.3/internal.git",
    ],
)
def test_a_git_source_on_a_local_or_private_address_fails_at_once_without_naming_it(
    worker: WorkerProcess, api: APIClient, git_server: GitServer, url: str
) -> None:
    url = url.format(port=git_server.port)
    requests_before = len(git_server.requests)

    job = wait_final(submit(api, "test", {"source": {"git": {"url": url, "ref": "v1"}}})["id"], timeout=60)

    assert job.status == Job.Status.FAILED
    assert job.attempts == 1
    assert job.error["type"] == "PermanentError"
    assert url in job.error["message"]
    reasons = ("does not resolve to a public address", "only port(s) 443 may be reached")
    assert any(reason in job.error["message"] for reason in reasons), job.error["message"]
    if "localhost" in url:
        assert "127.0.0.1" not in job.error["message"]
        assert "127.0.0.1" not in full_log(api, str(job.id))
    assert len(git_server.requests) == requests_before  # never reached


LINKS = """
import os
os.makedirs("dist/sub", exist_ok=True)
open("dist/real.whl", "wb").write(b"wheel")
links = {
    "dist/shadow": "/etc/shadow",
    "dist/passwd": "/etc/passwd",
    "dist/settings.py": "/proc/self/cwd/project/settings.py",
    "dist/environ": "/proc/self/environ",
    "dist/up": "../../../../../../../../etc/passwd",
    "dist/etc": "/etc",
    "dist/sub/root": "/",
}
for name, target in links.items():
    os.symlink(target, name)
for source, name in (("/etc/passwd", "dist/hard"), ("/job/passwd", "dist/hard2")):
    try:
        os.link(source, name)
    except OSError as exc:
        print("hard link refused:", name, exc.strerror)
try:
    os.rename(os.getcwd(), os.getcwd() + ".x")
    os.symlink("/etc", os.getcwd())
    print("swapped the working directory")
except OSError as exc:
    print("could not swap the working directory:", exc.strerror)
print("links made")
"""


def test_artifacts_never_follow_links_out_of_the_tree(worker: WorkerProcess, api: APIClient) -> None:
    payload = {
        "source": {"files": {"links.py": LINKS}},
        "command": ["python", "links.py"],
        "artifacts": ["dist/**", "shadow", "passwd"],
    }
    job_id = submit(api, "build", payload)["id"]

    job = wait_final(job_id, timeout=60)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert [a["name"] for a in job.result["artifacts"]] == ["dist/real.whl"]
    log = full_log(api, job_id)
    assert "could not swap the working directory: Permission denied" in log
    for name in ("dist/shadow", "dist/passwd", "dist/settings.py", "dist/environ", "dist/up", "dist/etc"):
        assert f"not collected: {name} is a symbolic link" in log
    assert "root:" not in log


@pytest.mark.usefixtures("no_shared_worker")  # the shared worker has bwrap: it must not take the job
def test_a_worker_without_bwrap_refuses_tool_jobs_and_says_so(
    process_env: dict, api: APIClient, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in Path("/usr/bin").iterdir():
        if program.name != "bwrap":
            (bin_dir / program.name).symlink_to(program)
    log = tmp_path / "worker.log"
    without_bwrap = WorkerProcess({**process_env, "PATH": f"{bin_dir}:/usr/sbin:/sbin"}, log)
    without_bwrap.start()
    try:
        health = APIClient().get("/api/health/")
        source = {"files": {"test_a.py": "def test_a(): pass\n"}}
        job = wait_final(submit(api, "test", {"source": source})["id"], timeout=60)
    finally:
        without_bwrap.stop()

    assert job.status == Job.Status.FAILED
    assert job.attempts == 1
    assert job.error["type"] == "SandboxUnavailable"
    assert "bwrap (bubblewrap) is not installed" in job.error["message"]
    assert "JOB_SANDBOX=rlimit" in job.error["message"]
    assert health.status_code == 503
    assert "unavailable on 1 worker(s): bwrap (bubblewrap) is not installed" in health.json()["sandbox"]
    assert "sandbox: NONE" in log.read_text()


def test_any_bytes_a_tool_prints_are_kept_and_the_job_succeeds(worker: WorkerProcess, api: APIClient) -> None:
    script = "import sys; sys.stdout.buffer.write(b'nul:\\x00 bad:\\xff\\xfe end\\n')"
    job_id = submit(api, "test", {"source": {"files": {"odd.py": script}}, "command": ["python", "odd.py"]})["id"]

    stream = api.get(f"/api/jobs/{job_id}/stream/", HTTP_ACCEPT="text/event-stream")
    body = b"".join(stream).decode()
    job = wait_final(job_id)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert "nul:\ufffd bad:\ufffd\ufffd end" in full_log(api, job_id)
    assert any("nul:\ufffd bad:\ufffd\ufffd end" in data.get("text", "") for _, data in sse_events(body))
