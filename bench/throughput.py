"""Conveyor against raw Celery on the same Redis, PostgreSQL and worker (`make bench`).

Prints each figure with its ratio to the reference. Submission goes through the real API view
(in-process Django test client: the view, serializers, bulk insert and publish, without HTTP).
Uses its own PostgreSQL database (BENCH_DATABASE_URL) and Redis database (BENCH_REDIS_URL),
both emptied first.
"""

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.update(
    DJANGO_SETTINGS_MODULE="project.settings",
    SECRET_KEY=os.environ.get("SECRET_KEY", "bench-only"),
    DATABASE_URL=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/conveyor_bench"),
    REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
    JOBS_SUBMIT_RATE="1000000/min",
    ALLOWED_HOSTS="testserver",
    LOG_LEVEL="WARNING",
)
os.environ.pop("CELERY_BROKER_URL", None)

import django  # noqa: E402

django.setup()

import psutil  # noqa: E402
import redis  # noqa: E402
from celery import current_app  # noqa: E402
from django.apps import apps  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from apps.jobs.models import Job  # noqa: E402
from bench.raw import noop  # noqa: E402

N = int(os.environ.get("BENCH_N", "5000"))
BACKLOG = int(os.environ.get("BENCH_BACKLOG", "10000"))
CONCURRENCY = os.environ.get("BENCH_CONCURRENCY", "2")
R = redis.Redis.from_url(settings.REDIS_URL)


def ensure_database() -> None:
    name = connection.settings_dict["NAME"]
    try:
        connection.ensure_connection()
    except Exception:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {name}"], check=True)
    call_command("migrate", verbosity=0)


def reset() -> None:
    """Empty tables (TRUNCATE: deleting thousands of rows would leave the next measurement a bloated
    table and its indexes, which autovacuum tidies only later) and an empty Redis database."""
    tables = [model._meta.db_table for model in apps.get_app_config("jobs").get_models()]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
    R.flushdb()


def start_worker() -> subprocess.Popen:
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-P", "prefork", "-c", CONCURRENCY, "-l", "WARNING",
         "-Q", ",".join(settings.JOBS_QUEUES), "--include", "bench.raw", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=os.environ.copy(), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not current_app.control.ping(timeout=0.5):
        if time.monotonic() > deadline:
            raise SystemExit("worker did not start")
    return worker


def stop_worker(worker: subprocess.Popen) -> None:
    """Warm shutdown; killed if it takes over 30 s. Returns once no worker answers a ping, so that
    the next measurement's worker is alone."""
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        print("worker: no warm shutdown within 30 s, killed", file=sys.stderr)
        os.killpg(worker.pid, signal.SIGKILL)  # its pool processes too: it leads its own session
        worker.wait()
    while current_app.control.ping(timeout=0.5):
        time.sleep(0.2)


def used(processes) -> float:
    """CPU seconds (user and system) the processes have spent; one that is gone counts nothing."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class CPU:
    """CPU time used by the worker's main process, its pool processes, PostgreSQL, Redis and this
    process (the submission) over a measurement, for where a job's time goes."""

    def __init__(self, worker: subprocess.Popen, **others: subprocess.Popen) -> None:
        self.worker = psutil.Process(worker.pid)
        self.others = {name: psutil.Process(process.pid) for name, process in others.items()}
        self.spent: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        named = {"postgres": [], "redis": []}
        for process in psutil.process_iter(["name"]):
            for prefix in named:
                if (process.info["name"] or "").startswith(prefix):
                    named[prefix].append(process)
        return {
            "worker main": used([self.worker]),
            "pool": used(self.worker.children(recursive=True)),
            "postgres": used(named["postgres"]),
            "redis": used(named["redis"]),
            "bench": used([psutil.Process()]),
            **{name: used([process]) for name, process in self.others.items()},
        }

    def __enter__(self) -> "CPU":
        self._start, self._wall = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        self.spent = {name: end[name] - self._start[name] for name in end}
        self.spent["wall"] = time.perf_counter() - self._wall

    def per_job(self, n: int) -> str:
        return ", ".join(f"{name} {seconds / n * 1000:.2f}" for name, seconds in self.spent.items())


def wait(condition, timeout: float = 600, interval: float = 0.01, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def raw_throughput() -> tuple[float, float]:
    R.set("bench:done", 0)
    start = time.perf_counter()
    for _ in range(N):
        noop.apply_async(queue="default", priority=6)
    published = time.perf_counter()
    wait(lambda: int(R.get("bench:done") or 0) >= N, what="raw tasks to drain")
    drained = time.perf_counter()
    return N / (published - start), N / (drained - start)


def conveyor_throughput(api: APIClient) -> tuple[float, float]:
    body = {"jobs": [{"kind": "echo", "payload": {"message": "m"}}] * N}
    start = time.perf_counter()
    response = api.post("/api/jobs/batch/", body, format="json")
    accepted = time.perf_counter()
    assert response.status_code == 201, response.content[:500]
    wait(lambda: Job.objects.filter(status=Job.Status.SUCCEEDED).count() >= N, interval=0.05, what="jobs to succeed")
    done = time.perf_counter()
    return N / (accepted - start), N / (done - start)


def handwired_throughput(user: User) -> float:
    """The same job rows, inserted with `bulk_create` and driven by `bench.handwired` (one
    `apply_async` each, after the commit): what a team would wire by hand."""
    from django.db import transaction
    from django.utils import timezone

    from apps.jobs.services import build_job
    from bench.raw import handwired

    start = time.perf_counter()
    jobs = [build_job(user, {"kind": "echo", "payload": {"message": "m"}}) for _ in range(N)]
    now = timezone.now()
    for job in jobs:
        job.created_at = job.queued_at = now
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
    for job in jobs:
        handwired.apply_async(args=[str(job.pk), job.payload["message"]], queue="default", priority=6)
    wait(lambda: Job.objects.filter(status=Job.Status.SUCCEEDED).count() >= N, interval=0.05, what="rows to succeed")
    return N / (time.perf_counter() - start)


def raw_pickup(samples: int = 200) -> float:
    tag = "pickup"
    for _ in range(samples):
        sent = time.time()
        noop.apply_async(args=[sent, 0, tag], queue="default", priority=6)
        wait(lambda sent=sent: R.hexists(f"bench:started:{tag}", str(sent)), interval=0.001)
    started = R.hgetall(f"bench:started:{tag}")
    return statistics.median(float(v) - float(k) for k, v in started.items()) * 1000


def conveyor_pickup(api: APIClient, samples: int = 200) -> float:
    latencies = []
    for _ in range(samples):
        job_id = api.post("/api/jobs/", {"kind": "echo", "payload": {"message": "m"}}, format="json").json()["id"]
        wait(lambda job_id=job_id: Job.objects.filter(pk=job_id, started_at__isnull=False).exists(), interval=0.001)
        job = Job.objects.get(pk=job_id)
        latencies.append((job.started_at - job.created_at).total_seconds())
        wait(lambda job_id=job_id: Job.objects.filter(pk=job_id, status=Job.Status.SUCCEEDED).exists())
    return statistics.median(latencies) * 1000


def raw_priority() -> float:
    for _ in range(BACKLOG):
        noop.apply_async(args=[0, 5], queue="default", priority=6)
    time.sleep(0.5)
    sent = time.time()
    noop.apply_async(args=[sent, 0, "prio"], queue="default", priority=0)
    wait(lambda: R.hexists("bench:started:prio", str(sent)), interval=0.001)
    started = float(R.hget("bench:started:prio", str(sent)))
    R.delete("default", *[f"default:{p}" for p in (0, 3, 6, 9)])  # drop the rest of the backlog
    return (started - sent) * 1000


def conveyor_priority(api: APIClient) -> float:
    normal = {"kind": "echo", "payload": {"message": "n", "sleep_ms": 5}}
    for _ in range(BACKLOG // 5000 or 1):
        assert api.post("/api/jobs/batch/", {"jobs": [normal] * min(BACKLOG, 5000)}, format="json").status_code == 201
    time.sleep(0.5)
    response = api.post(
        "/api/jobs/", {"kind": "echo", "priority": "critical", "payload": {"message": "c"}}, format="json"
    )
    job_id = response.json()["id"]
    wait(lambda: Job.objects.filter(pk=job_id, started_at__isnull=False).exists(), interval=0.001)
    job = Job.objects.get(pk=job_id)
    return (job.started_at - job.created_at).total_seconds() * 1000


def row(name: str, conveyor: float, raw: float, unit: str, target: str) -> None:
    print(
        f"{name:<30} conveyor {conveyor:>8.1f} {unit:<3} raw celery {raw:>8.1f} {unit:<3} "
        f"ratio {conveyor / raw:5.2f}  ({target})"
    )


def prepare() -> tuple[User, APIClient]:
    """A migrated, emptied benchmark database and an API client of the `bench` user."""
    ensure_database()
    reset()
    user, _ = User.objects.get_or_create(username="bench")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return user, api


def main() -> None:
    user, api = prepare()
    worker = start_worker()
    try:
        with CPU(worker) as raw_cpu:
            raw_publish, raw_e2e = raw_throughput()
        with CPU(worker) as conveyor_cpu:
            sub, e2e = conveyor_throughput(api)
        reset()
        with CPU(worker) as hand_cpu:
            hand_e2e = handwired_throughput(user)
        reset()
        Token.objects.get_or_create(user=user)
        raw_p50 = raw_pickup()
        p50 = conveyor_pickup(api)
        raw_prio = raw_priority()
        reset()
        prio = conveyor_priority(api)
    finally:
        stop_worker(worker)
        reset()
    print(
        f"\n{N} jobs, backlog {BACKLOG}, worker prefork -c {CONCURRENCY}, "
        f"broker {settings.CELERY_BROKER_URL}, db {connection.vendor}"
    )
    row("end-to-end", e2e, raw_e2e, "/s", "target ratio >= 0.6")
    print(
        f"{'end-to-end, hand-wired':<30} conveyor {e2e:>8.1f} /s  hand-wired {hand_e2e:>8.1f} /s  "
        f"ratio {e2e / hand_e2e:5.2f}  (target ratio >= 1.2)"
    )
    for name, cpu in (("raw celery", raw_cpu), ("conveyor", conveyor_cpu), ("hand-wired", hand_cpu)):
        print(f"  CPU ms per job, {name + ':':<12} {cpu.per_job(N)}")
    row("submission", sub, raw_publish, "/s", "target ratio >= 2")
    row("pickup p50", p50, raw_p50, "ms", "target ratio <= 2, aim < 10 ms")
    print(
        f"{'critical behind backlog':<30} conveyor {prio:>8.1f} ms  raw celery {raw_prio:>8.1f} ms  "
        "(target: conveyor <= 50 ms)"
    )


if __name__ == "__main__":
    main()
