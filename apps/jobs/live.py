"""Live job events over Redis pub/sub: status changes, progress, log output, partial AI text.

Publishing is fire-and-forget (a subscriber that is not listening misses nothing it cannot read back
from the job row and the stored log); a Redis failure here never fails a job.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import redis
from django.conf import settings

log = logging.getLogger(__name__)

_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:  # redis-py's pool reconnects by itself after a fork
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)
    return _client


def channel(job_id: UUID | str) -> str:
    return f"conveyor:job:{job_id}"


def publish(job_id: UUID | str, event: dict[str, Any]) -> None:
    try:
        client().publish(channel(job_id), json.dumps(event, default=str))
    except redis.RedisError as exc:
        log.warning("live event for job %s not published: %s", job_id, exc)


@contextmanager
def subscription(job_id: UUID | str) -> Iterator[redis.client.PubSub]:
    pubsub = client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job_id))
    try:
        yield pubsub
    finally:
        pubsub.close()
