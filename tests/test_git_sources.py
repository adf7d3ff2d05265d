"""Git sources fetched as hostile code: inside the job's sandbox and as its user, through the egress
proxy (over https), within a size and a time limit; in both confinements."""

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from django.test import override_settings

from tasks.context import PermanentError, RetryableError
from tasks.sandbox.sources import clone
from tasks.sandbox.workspace import Workspace
from tests.conftest import require_bwrap
from tests.git_https import GitServer


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def line(self, text: str) -> None:
        self.text += text + "\n"

    def write(self, data: bytes) -> None:
        self.text += data.decode(errors="replace")

    def tick(self) -> None:
        pass


@pytest.fixture(params=["rlimit", "bwrap"])
def workspace(request: pytest.FixtureRequest) -> Iterator[Workspace]:
    require_bwrap(request.param)
    ws = Workspace.create(sandbox=request.param)
    yield ws
    ws.remove()


@pytest.fixture
def trusted(git_server: GitServer) -> Iterator[str]:
    with override_settings(JOB_GIT_ALLOWED_HOSTS=["127.0.0.1"], JOB_GIT_CA_FILE=str(git_server.cert)):
        yield f"https://127.0.0.1:{git_server.port}/sample.git"


def test_git_checks_out_the_ref_as_the_jobs_user(workspace: Workspace, trusted: str) -> None:
    clone(trusted, "v1", workspace, Lines())

    files = sorted(path.name for path in workspace.src.iterdir())
    assert files == [".git", "pyproject.toml", "sample", "tests"]
    assert {path.stat().st_uid for path in workspace.src.rglob("*")} == {workspace.uid}


def test_a_repository_larger_than_the_limit_is_not_fetched(workspace: Workspace, trusted: str) -> None:
    with override_settings(JOB_GIT_MAX_BYTES=2000), pytest.raises(PermanentError, match="JOB_GIT_MAX_BYTES"):
        clone(trusted, "v1", workspace, Lines())


@pytest.fixture
def silent_host() -> Iterator[int]:
    """A host that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_fetch_that_takes_too_long_is_stopped(workspace: Workspace, silent_host: int) -> None:
    started = time.monotonic()
    with (
        override_settings(JOB_GIT_ALLOWED_HOSTS=["127.0.0.1"], JOB_GIT_TIMEOUT_SECONDS=2),
        pytest.raises(RetryableError, match="JOB_GIT_TIMEOUT_SECONDS"),
    ):
        clone(f"https://127.0.0.1:{silent_host}/slow.git", "main", workspace, Lines())

    assert time.monotonic() - started < 15


@pytest.mark.parametrize("url", ["file:///", "file:///root", "file:///tmp/../root/x.git", "file:///tmp"])
def test_a_file_repository_outside_the_roots_is_refused_before_anything_is_mounted(
    workspace: Workspace, url: str
) -> None:
    with pytest.raises(PermanentError, match="JOB_GIT_FILE_ROOTS"):
        clone(url, "main", workspace, Lines())
