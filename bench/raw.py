"""The reference: plain Celery tasks, imported into the benchmark's worker with `--include bench.raw`."""

import time

import redis
from celery import shared_task
from django.conf import settings

_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.REDIS_URL)
    return _redis


@shared_task(name="bench.noop")
def noop(sent_at: float = 0.0, sleep_ms: int = 0, tag: str = "") -> None:
    """Records when it started (for pickup latency) and counts itself (to know when a run drained)."""
    started = time.time()
    if tag:
        _client().hset(f"bench:started:{tag}", str(sent_at), started)
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    _client().incr("bench:done")


@shared_task(name="bench.handwired")
def handwired(job_id: str, message: str) -> None:
    """The reference a user would otherwise build: a plain Celery task that claims a job row and
    completes it with two ORM updates (no timeline, no lease, no live events, no progress)."""
    from django.db.models import F
    from django.utils import timezone

    from apps.jobs.models import Job

    claimed = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(
        status=Job.Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1
    )
    if claimed:
        Job.objects.filter(pk=job_id).update(
            status=Job.Status.SUCCEEDED, result={"message": message}, finished_at=timezone.now()
        )
