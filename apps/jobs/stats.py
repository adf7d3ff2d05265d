"""What operators read: queue depths from the broker, the oldest waiting job, live workers, and
counts and timings of finished jobs. The counts are never a `COUNT(*)` over the job table per
request: a roll-up (run by beat with the reconciler) adds each finished job, once, to per-minute
counts, hourly timing histograms and all-time totals; requests read those small tables and the
indexes of the unfinished jobs."""

import math
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from apps.jobs import live, workers
from apps.jobs.models import ACTIVE_STATUSES, Job, JobMinute, JobTiming, JobTotal, Priority, StatsCursor, Status
from apps.jobs.reconciler import broker_depths

ALL_TIME = datetime(1970, 1, 1, tzinfo=UTC)
BATCH = 20_000
LAG = timedelta(seconds=2)  # a job is counted once it finished this long ago (its commit is in)
BUCKETS_PER_DOUBLING = 4
RECONCILER_KEY = "conveyor:stats:reconciler"


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: bucket b holds durations up to 2**(b/4) milliseconds."""
    return max(0, math.ceil(BUCKETS_PER_DOUBLING * math.log2(max(seconds * 1000, 1))))


def bucket_upper(bucket: int) -> float:
    """The longest duration (seconds) in a bucket."""
    return 2 ** (bucket / BUCKETS_PER_DOUBLING) / 1000


# --- the roll-up ----------------------------------------------------------------------------------


def rollup(now: datetime | None = None) -> int:
    """Add the jobs that finished since the last roll-up to the statistics. Returns how many."""
    upto = (now or timezone.now()) - LAG
    with transaction.atomic():
        cursor = StatsCursor.objects.select_for_update().first()
        if cursor is None:
            cursor = StatsCursor.objects.create(finished_up_to=upto)  # counting starts now
            return 0
        rows = list(
            Job.objects.filter(finished_at__gte=cursor.finished_up_to, finished_at__lt=upto)
            .order_by("finished_at")
            .values_list("kind", "status", "finished_at", "queued_at", "started_at", "attempts")[:BATCH]
        )
        if len(rows) == BATCH:  # more to come: stop before the last instant, whose jobs may go on
            last = rows[-1][2]
            if rows[0][2] != last:
                rows = [row for row in rows if row[2] != last]
            upto = last if rows[0][2] != last else last + timedelta(microseconds=1)
        _add(rows)
        cursor.finished_up_to = upto
        cursor.save(update_fields=["finished_up_to"])
        JobMinute.objects.filter(minute__lt=upto - timedelta(days=settings.JOBS_STATS_MINUTES_DAYS)).delete()
        JobTiming.objects.filter(
            hour__gt=ALL_TIME, hour__lt=upto - timedelta(days=settings.JOBS_STATS_HOURS_DAYS)
        ).delete()
    return len(rows)


def _add(rows: list[tuple]) -> None:
    minutes: Counter = Counter()
    timings: Counter = Counter()
    totals: Counter = Counter()
    attempts: Counter = Counter()
    for kind, status, finished, queued, started, tries in rows:
        minutes[(finished.replace(second=0, microsecond=0), kind, status)] += 1
        totals[(kind, status)] += 1
        attempts[(kind, status)] += tries
        hour = finished.replace(minute=0, second=0, microsecond=0)
        for metric, seconds in (("wait", _seconds(queued, started)), ("run", _seconds(started, finished))):
            if seconds is not None:
                timings[(hour, kind, metric, bucket_of(seconds))] += 1
                timings[(ALL_TIME, kind, metric, bucket_of(seconds))] += 1
    for (minute, kind, status), n in minutes.items():
        _increment(JobMinute, {"minute": minute, "kind": kind, "status": status}, jobs=n)
    for (hour, kind, metric, bucket), n in timings.items():
        _increment(JobTiming, {"hour": hour, "kind": kind, "metric": metric, "bucket": bucket}, jobs=n)
    for (kind, status), n in totals.items():
        _increment(JobTotal, {"kind": kind, "status": status}, jobs=n, attempts=attempts[(kind, status)])


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return max(0.0, (end - start).total_seconds()) if start and end else None


def _increment(model: type, key: dict[str, Any], **amounts: int) -> None:
    if not model.objects.filter(**key).update(**{name: F(name) + n for name, n in amounts.items()}):
        model.objects.create(**key, **amounts)


def record_reconcile(counts: dict[str, int]) -> None:
    """The reconciler's actions, added up in Redis (for /metrics)."""
    if any(counts.values()):
        with live.client().pipeline(transaction=False) as pipe:
            for action, n in counts.items():
                if n:
                    pipe.hincrby(RECONCILER_KEY, action, n)
            pipe.execute()


def pruned_totals() -> dict[str, int]:
    from apps.jobs.retention import PRUNED_KEY

    return {k.decode(): int(v) for k, v in live.client().hgetall(PRUNED_KEY).items()}


def reconciler_totals() -> dict[str, int]:
    return {k.decode(): int(v) for k, v in live.client().hgetall(RECONCILER_KEY).items()}


# --- what the endpoints read -------------------------------------------------------------------------


def queues() -> dict[str, dict[str, Any]]:
    """Per queue: messages waiting in the broker (every priority), and the oldest waiting job."""
    now = timezone.now()
    oldest = _oldest_queued()
    found: dict[str, dict[str, Any]] = {}
    try:
        with current_app.connection_for_read() as conn:  # one connection for every queue
            depths = {queue: broker_depths(queue, conn) for queue in settings.JOBS_QUEUES}
    except Exception:  # the broker is away: the job table still says how old the backlog is
        depths = {}
    for queue in settings.JOBS_QUEUES:
        by_priority = {p: n for p, n in depths.get(queue, {}).items() if p is not None}
        first = oldest.get(queue)
        found[queue] = {
            "depth": sum(depths[queue].values()) if queue in depths else None,
            "depth_by_priority": by_priority,
            "oldest_waiting_seconds": round((now - first).total_seconds(), 3) if first else 0.0,
        }
    return found


def _oldest_queued() -> dict[str, datetime]:
    """The oldest queued job's `queued_at` per queue: one index probe per queue and priority (the
    job_active index), in one statement on PostgreSQL. Jobs held back by a user concurrency limit
    are left out: more workers would not start them."""
    pairs = [(queue, priority) for queue in settings.JOBS_QUEUES for priority in Priority.values]
    if connection.vendor == "postgresql":
        probe = (
            '(SELECT %s::text AS queue, "queued_at" FROM "jobs_job" WHERE "status" = %s AND "queue" = %s'
            ' AND "priority" = %s AND "held_at" IS NULL ORDER BY "queued_at" LIMIT 1)'
        )
        params: list[Any] = []
        for queue, priority in pairs:
            params += [queue, Status.QUEUED, queue, priority]
        with connection.cursor() as cursor:
            cursor.execute(" UNION ALL ".join([probe] * len(pairs)), params)
            rows = cursor.fetchall()
    else:
        rows = [
            (queue, first)
            for queue, priority in pairs
            if (
                first := Job.objects.filter(status=Status.QUEUED, queue=queue, priority=priority, held_at__isnull=True)
                .order_by("queued_at")
                .values_list("queued_at", flat=True)
                .first()
            )
        ]
    oldest: dict[str, datetime] = {}
    for queue, first in rows:
        if first and (queue not in oldest or first < oldest[queue]):
            oldest[queue] = first
    return oldest


def unfinished() -> dict[tuple[str, str], int]:
    """(status, queue) -> jobs not finished yet, read from the job_active index alone."""
    rows = Job.objects.filter(status__in=ACTIVE_STATUSES).values_list("status", "queue").annotate(n=Count("*"))
    return {(status, queue): n for status, queue, n in rows.order_by()}


def finished_since(since: datetime) -> tuple[dict[str, int], dict[str, int]]:
    rows = JobMinute.objects.filter(minute__gte=since).values_list("status", "kind").annotate(n=Sum("jobs"))
    by_status: Counter = Counter()
    by_kind: Counter = Counter()
    for status, kind, n in rows.order_by():
        by_status[status] += n
        by_kind[kind] += n
    return dict(by_status), dict(by_kind)


def throughput(minutes: int = 60) -> list[dict[str, Any]]:
    now = timezone.now().replace(second=0, microsecond=0)
    since = now - timedelta(minutes=minutes - 1)
    rows = dict(JobMinute.objects.filter(minute__gte=since).values_list("minute").annotate(n=Sum("jobs")).order_by())
    return [
        {"minute": (since + timedelta(minutes=i)).isoformat(), "finished": rows.get(since + timedelta(minutes=i), 0)}
        for i in range(minutes)
    ]


def percentiles(since: datetime | None) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per kind, p50 and p95 of the queue wait and the run time (seconds, to the histogram's bucket)."""
    found = JobTiming.objects.filter(hour__gte=since) if since else JobTiming.objects.filter(hour=ALL_TIME)
    histograms: dict[tuple[str, str], Counter] = {}
    for kind, metric, bucket, n in found.values_list("kind", "metric", "bucket").annotate(n=Sum("jobs")).order_by():
        histograms.setdefault((kind, metric), Counter())[bucket] += n
    result: dict[str, dict[str, dict[str, float | None]]] = {}
    for (kind, metric), histogram in sorted(histograms.items()):
        name = "queue_wait_seconds" if metric == "wait" else "run_seconds"
        result.setdefault(kind, {})[name] = {"p50": _quantile(histogram, 0.5), "p95": _quantile(histogram, 0.95)}
    return result


def _quantile(histogram: Counter, q: float) -> float | None:
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= q * total:
            return round(bucket_upper(bucket), 4)
    return None


def dead_letters() -> int:
    """Dead-lettered jobs waiting for a replay (the partial index job_dead_lettered)."""
    return Job.objects.filter(dead_lettered=True).count()


def snapshot() -> dict[str, Any]:
    started = time.perf_counter()
    now = timezone.now()
    hour, day = finished_since(now - timedelta(hours=1)), finished_since(now - timedelta(days=1))
    unfinished_now = unfinished()
    by_status_now: Counter = Counter()
    for (status, _), n in unfinished_now.items():
        by_status_now[status] += n
    alive = workers.alive()
    return {
        "queues": queues(),
        "unfinished": dict(by_status_now),
        "last_hour": {"finished_by_status": hour[0], "finished_by_kind": hour[1]},
        "last_day": {"finished_by_status": day[0], "finished_by_kind": day[1]},
        "throughput_per_minute": throughput(60),
        "timings_last_day": percentiles(now - timedelta(days=1)),
        "workers": [
            {key: status.get(key) for key in ("name", "queues", "pool", "concurrency", "running", "sandbox")}
            for _, status in sorted(alive.items())
        ],
        "dead_letters": dead_letters(),
        "counted_up_to": (StatsCursor.objects.values_list("finished_up_to", flat=True).first()),
        "took_ms": round((time.perf_counter() - started) * 1000, 1),
    }
