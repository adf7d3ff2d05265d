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
