"""Flower as the Procfile starts it (`python -m project.flower`), a real process on the tests' broker:
it asks for credentials on every page, refuses to start without them, sees the jobs of workers started
as the Procfile starts them, and still shows them after a restart."""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient
from tornado.web import RequestHandler, StaticFileHandler

from project.flower import CredentialsError, configured_credentials
from tests.conftest import (
    ROOT,
    PrivateRedis,
    WorkerProcess,
    _free_port,
    publishing_to,
    stop_group,
    wait_final,
    wait_for,
)
from tests.factories import submit

CREDENTIALS = "watcher:s3cret-pass"


def procfile(process: str) -> str:
    """The Procfile's command line for `process`, unexpanded."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name == process:
            return command.strip()
    raise AssertionError(f"no {process} in the Procfile")


def flower_env(folder: Path, **extra: str) -> dict[str, str]:
    """Flower's environment: the tests' settings and broker (unless `extra` names another), DEBUG off, its
    state in `folder`, and no credentials unless `extra` gives some (empty values, set here, win over
    what a developer's `.env` holds)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the Procfile's `python` is this one
        "DJANGO_SETTINGS_MODULE": "project.test_settings",
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "DEBUG": "false",
        "FLOWER_BASIC_AUTH": "",
        "FLOWER_BASIC_AUTH_FILE": "",
        "FLOWER_DB": str(folder / "flower.db"),
        # Flower switches task events on in the workers it sees; here only a worker's own flag may.
        "FLOWER_ENABLE_EVENTS": "false",
        # Flower's exit waits for the worker inspection under way (its timeout, 1 s by default).
        "FLOWER_INSPECT_TIMEOUT": "200",
        **extra,
    }


def request(port: int, path: str, credentials: str = "", method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of a request to Flower; status 0 when nothing answers."""
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}
    data = b"" if method == "POST" else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:  # noqa: S310 (our own server)
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class FlowerProcess:
    """The Procfile's `flower` command, run by a shell as honcho runs it, on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.env = {**env, "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            ["bash", "-c", procfile("flower")], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_for(self._answers, timeout=20, interval=0.1, what="Flower to answer")

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"Flower exited: {self.log_path.read_text(errors='replace')}")
        return request(self.port, "/healthcheck")[0] != 0

    def tasks(self) -> dict[str, dict]:
        status, body = request(self.port, "/api/tasks", CREDENTIALS)
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        stop_group(self.proc, grace=10)  # as honcho stops it: Flower saves its state and exits
        self.proc = None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A broker of this module's own, for Flower and a worker of its own: the session's shared worker
    (on the tests' broker) runs on undisturbed."""
    server = PrivateRedis(tmp_path_factory.mktemp("broker"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def flower(broker: PrivateRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerProcess]:
    folder = tmp_path_factory.mktemp("flower")
    env = flower_env(folder, FLOWER_BASIC_AUTH=CREDENTIALS, CELERY_BROKER_URL=broker.url)
    process = FlowerProcess(env, folder / "flower.log")
    process.start()
    yield process
    process.stop()


def flower_routes() -> list[tuple[str, str]]:
    """(method, path) of every page and API call Flower serves, but its static files, its login page (a
    404 without OAuth), its logout page (a farewell) and its catch-all 404."""
    from flower.urls import handlers
    from flower.views.auth import LoginHandler, LogoutHandler
    from flower.views.error import NotFoundErrorHandler

    routes = []
    for handler in handlers:
        pattern, cls = (handler.regex.pattern, handler.handler_class) if hasattr(handler, "regex") else handler[:2]
        if cls in (StaticFileHandler, LoginHandler, LogoutHandler, NotFoundErrorHandler):
            continue
        path = re.sub(r"\([^)]*\)", "x", pattern).removesuffix("$")
        routes += [(m.upper(), path) for m in ("get", "post") if getattr(cls, m) is not getattr(RequestHandler, m)]
    return routes


def test_every_flower_page_and_api_call_asks_for_credentials(flower: FlowerProcess) -> None:
    routes = flower_routes()
    assert {("GET", "/"), ("GET", "/api/workers"), ("GET", "/metrics"), ("GET", "/healthcheck")} <= set(routes)

    for method, path in routes:
        assert request(flower.port, path, method=method)[0] == 401, (method, path)
        assert request(flower.port, path, "watcher:wrong", method=method)[0] == 401, (method, path)


def test_flower_answers_with_its_credentials(flower: FlowerProcess) -> None:
    for path in ("/", "/api/workers", "/metrics", "/healthcheck"):
        assert request(flower.port, path, CREDENTIALS)[0] == 200, path

    assert b"flower_events_total" in request(flower.port, "/metrics", CREDENTIALS)[1]


@pytest.mark.parametrize(
    ("extra", "argv", "message"),
    [
        ({}, [], "no credentials: set FLOWER_BASIC_AUTH=user:password"),
        ({"FLOWER_BASIC_AUTH": "admin"}, [], "FLOWER_BASIC_AUTH must be user:password"),
        ({"FLOWER_BASIC_AUTH": "admin:pw"}, ["--basic-auth=admin:pw"], "not on the command line"),
        ({"FLOWER_BASIC_AUTH_FILE": "/nonexistent/secret"}, [], "FLOWER_BASIC_AUTH_FILE: cannot read"),
    ],
    ids=["none", "no-password", "on-the-command-line", "unreadable-file"],
)
def test_flower_refuses_to_start_without_usable_credentials_when_debug_is_off(
    tmp_path: Path, extra: dict, argv: list[str], message: str
) -> None:
    port = _free_port()

    done = subprocess.run(
        [sys.executable, "-m", "project.flower", f"--port={port}", *argv],
        cwd=ROOT, env=flower_env(tmp_path, **extra), capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert done.returncode != 0
    assert message in done.stderr
    assert request(port, "/healthcheck")[0] == 0  # nothing listens


def test_flower_refuses_to_serve_when_a_config_file_takes_the_credentials_away(tmp_path: Path) -> None:
    config = tmp_path / "flowerconfig.py"
    config.write_text("basic_auth = []\n")
    port = _free_port()

    done = subprocess.run(
        [sys.executable, "-m", "project.flower", f"--port={port}", f"--conf={config}"],
        cwd=ROOT, env=flower_env(tmp_path, FLOWER_BASIC_AUTH=CREDENTIALS), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip

    assert done.returncode != 0
    assert "no credentials: set FLOWER_BASIC_AUTH" in done.stderr
    assert request(port, "/healthcheck")[0] == 0


def test_credentials_may_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(CREDENTIALS + "\n")

    assert configured_credentials({"FLOWER_BASIC_AUTH_FILE": str(secret)}) == CREDENTIALS
    assert configured_credentials({"FLOWER_BASIC_AUTH": "", "FLOWER_BASIC_AUTH_FILE": f" {secret} "}) == CREDENTIALS
    with pytest.raises(CredentialsError, match="not both"):
        configured_credentials({"FLOWER_BASIC_AUTH": CREDENTIALS, "FLOWER_BASIC_AUTH_FILE": str(secret)})
    secret.write_text("\n")
    with pytest.raises(CredentialsError, match="is empty"):
        configured_credentials({"FLOWER_BASIC_AUTH_FILE": str(secret)})


def test_with_debug_on_flower_makes_credentials_of_its_own_and_says_where(broker: PrivateRedis, tmp_path: Path) -> None:
    process = FlowerProcess(flower_env(tmp_path, DEBUG="true", CELERY_BROKER_URL=broker.url), tmp_path / "flower.log")

    process.start()
    try:
        made = tmp_path / "flower-basic-auth"
        assert f"the credentials are in {made}" in process.log_path.read_text()
        assert made.stat().st_mode & 0o777 == 0o600
        assert request(process.port, "/api/workers")[0] == 401
        assert request(process.port, "/api/workers", made.read_text().strip())[0] == 200
    finally:
        process.stop()


@pytest.mark.django_db(transaction=True)
def test_flower_sees_the_jobs_of_a_worker_started_as_the_procfile_does_and_keeps_them_over_a_restart(
    flower: FlowerProcess, broker: PrivateRedis, process_env: dict, api: APIClient, tmp_path: Path
) -> None:
    # Given a worker with the Procfile's flag for task events (Flower switches none on here),
    events = [word for word in shlex.split(procfile("worker")) if word in ("-E", "--task-events")]
    assert events, "the Procfile's worker sends no task events"
    env = {**process_env, "CELERY_BROKER_URL": broker.url}
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=("-P", "prefork", "-c", "1", *events))
    try:
        with publishing_to(broker.url):  # this process pings the worker and submits the job there
            worker.start()
            # when it runs a job,
            job = wait_final(submit(api, "echo", {"message": "for Flower"})["id"])
        assert job.status == "succeeded"

        # then Flower lists the job's Celery task as it happened,
        def seen() -> dict | None:
            task = flower.tasks().get(job.task_id)
            return task if task and task["state"] == "SUCCESS" else None

        task = wait_for(seen, timeout=10, what="Flower to list the job's task")
    finally:
        worker.stop()
    assert task["name"] == "conveyor.run_job"
    assert str(job.pk) in task["args"]

    # and still does once restarted, from the state it saved on the way out.
    flower.stop()
    flower.start()
    assert flower.tasks()[job.task_id]["state"] == "SUCCESS"
