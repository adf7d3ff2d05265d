"""`/api/stats/`, `/api/health/`, `/metrics` and the job list's first page with a million jobs in the
table (`make bench`): p50/p95 of each, against the reference a naive endpoint would be (a `COUNT(*)`
by status and kind over the table, and the oldest queued job by a scan).

Its own database (BENCH_STATS_DATABASE_URL) and Redis database (BENCH_STATS_REDIS_URL): the million
rows are written once with COPY and kept for the next run (BENCH_STATS_REFILL=1 writes them again).
Requests go through the real views in-process (Django's test client: no HTTP, the views' own work).
"""

# ruff: noqa: I001 (bench.throughput must be imported first: it configures Django)
import logging
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench/throughput.py sets Django up; this benchmark's own database and Redis database (its rows kept)
os.environ["BENCH_DATABASE_URL"] = os.environ.get(
    "BENCH_STATS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/conveyor_bench_stats"
)
os.environ["BENCH_REDIS_URL"] = os.environ.get("BENCH_STATS_REDIS_URL", "redis://127.0.0.1:6379/13")
os.environ.update(JOBS_READ_RATE="100000000/min", METRICS_TOKEN="bench-metrics")

from bench.throughput import ensure_database  # first: it sets Django up

import django
from django.contrib.auth.models import User
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from apps.jobs import stats
from apps.jobs.models import Job, StatsCursor

N = int(os.environ.get("BENCH_STATS_N", "1000000"))
SAMPLES = int(os.environ.get("BENCH_STATS_SAMPLES", "50"))
KINDS = ["echo", "ai_generate", "build", "test", "lint", "message"]
QUEUES = {"echo": "default", "ai_generate": "ai", "build": "builds", "test": "builds", "lint": "builds",
          "message": "messages"}  # fmt: skip
COLUMNS = ["id", "owner_id", "kind", "priority", "status", "payload", "progress", "progress_message", "attempts",
           "max_attempts", "timeout_seconds", "callback_url", "dedupe_key", "dead_lettered", "created_at",
           "queued_at", "started_at", "finished_at", "worker", "queue", "task_id", "process", "handbacks",
           "deferrals"]  # fmt: skip


def fill(owner: User) -> None:
    """A million jobs over the last two days: most finished (succeeded, some failed or dead-lettered),
    a backlog queued, a few running."""
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE jobs_job, jobs_jobminute, jobs_jobtiming, jobs_jobtotal, jobs_statscursor CASCADE")
    now = datetime.now(UTC)
    rng = random.Random(7)
    started = time.perf_counter()
    with (
        connection.cursor() as cursor,
        cursor.connection.cursor().copy(f"COPY jobs_job ({', '.join(COLUMNS)}) FROM STDIN") as copy,
    ):
        for i in range(N):
            kind = KINDS[i % len(KINDS)]
            created = now - timedelta(seconds=rng.uniform(0, 2 * 86400))
            roll = rng.random()
            if roll < 0.9:
                status = "succeeded"
            elif roll < 0.95:
                status = "failed"
            elif roll < 0.97:
                status = "cancelled"
            else:
                status = "queued" if roll < 0.995 else "running"
            queued = created + timedelta(milliseconds=1)
            begun = queued + timedelta(seconds=rng.expovariate(2)) if status != "queued" else None
            finished = begun + timedelta(seconds=rng.expovariate(0.5)) if status not in ("queued", "running") else None
            copy.write_row([
                uuid.uuid4(), owner.pk, kind, "normal", status, "{}", 100 if finished else 0, "", 1, 3, 300, "", "",
                status == "failed", created, queued, begun, finished, "bench@h" if begun else "", QUEUES[kind], "", "",
                0, 0,
            ])  # fmt: skip
    with connection.cursor() as cursor:  # as autovacuum leaves a table at rest: statistics, visibility map
        cursor.execute("VACUUM ANALYZE jobs_job")
    print(f"filled {N} jobs with COPY in {time.perf_counter() - started:.1f}s")
    StatsCursor.objects.create(finished_up_to=now - timedelta(days=3))
    started = time.perf_counter()
    while stats.rollup():
        pass
    print(f"rolled up in {time.perf_counter() - started:.1f}s")


def timed(call) -> tuple[float, float]:
    times = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def naive_stats() -> None:
    """What an endpoint that counts the table would do."""
    list(Job.objects.values_list("status", "kind").annotate(n=django.db.models.Count("id")).order_by())
    Job.objects.filter(status="queued").order_by("queued_at").values_list("queued_at", flat=True).first()


def main() -> None:
    logging.getLogger("django.request").setLevel(logging.CRITICAL)  # health's 503: no worker runs here
    ensure_database()
    owner, _ = User.objects.get_or_create(username="bench-stats", defaults={"is_staff": True})
    if os.environ.get("BENCH_STATS_REFILL") or Job.objects.count() < N:
        fill(owner)
    else:
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE jobs_job")
    staff = APIClient()
    staff.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=owner)[0].key}")
    scraper = APIClient()

    def ok(response) -> None:
        assert response.status_code in (200, 503), (response.status_code, response.content[:300])

    endpoints = {
        "/api/stats/": lambda: ok(staff.get("/api/stats/")),
        "/api/health/": lambda: ok(staff.get("/api/health/")),
        "/metrics": lambda: ok(scraper.get("/metrics", HTTP_AUTHORIZATION="Bearer bench-metrics")),
        "/api/jobs/ (first page)": lambda: ok(staff.get("/api/jobs/")),
    }
    for call in endpoints.values():
        call()  # warm: connections, caches
    reference = timed(naive_stats)
    print(f"{Job.objects.count()} jobs; {SAMPLES} requests each, in-process")
    print(f"{'endpoint':28} {'p50 ms':>8} {'p95 ms':>8}  target p95 < 100 ms")
    for name, call in endpoints.items():
        p50, p95 = timed(call)
        print(f"{name:28} {p50:8.1f} {p95:8.1f}  {'met' if p95 < 100 else 'NOT met'}")
    print(f"{'reference: COUNT(*) by status, kind':28} {reference[0]:8.1f} {reference[1]:8.1f}")
    p50, _ = timed(endpoints["/api/stats/"])
    print(f"ratio reference/stats p50: {reference[0] / p50:.1f}x")


if __name__ == "__main__":
    main()
