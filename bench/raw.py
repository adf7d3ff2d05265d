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


@shared_task(name="bench.sdk_call")
def sdk_call(base_url: str, key: str, prompt: str) -> None:
    """The ceiling of any Celery-based path for AI jobs: a plain task that makes the SDK call a direct
    caller makes (one shared HTTP client per process, as Conveyor's) and counts itself. No row, no key
    lookup, no live text."""
    import openai

    from tasks.providers import http_client

    client = openai.OpenAI(base_url=base_url, api_key=key, http_client=http_client("openai"), max_retries=0)
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    _client().incr("bench:done")
