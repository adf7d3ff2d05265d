"""Live job events over Redis pub/sub: status changes, progress, log output, partial AI text.

Publishing is fire-and-forget: events go through an in-process queue to a background thread, so a
job never waits for Redis on its way (a transition, a token), and a Redis failure never fails a job.
A subscriber that missed something reads it back from the job row and the stored log.
"""

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import redis
from django.conf import settings

log = logging.getLogger(__name__)

_client: redis.Redis | None = None
_outbox: "queue.SimpleQueue[tuple[str, str]] | None" = None
_outbox_pid = 0


def client() -> redis.Redis:
    global _client
    if _client is None:  # redis-py's pool reconnects by itself after a fork
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)
    return _client


def channel(job_id: UUID | str) -> str:
    return f"conveyor:job:{job_id}"


def publish(job_id: UUID | str, event: dict[str, Any]) -> None:
    _queue().put((channel(job_id), json.dumps(event, default=str)))


def flush(timeout: float = 5.0) -> None:
    """Wait until what was published so far has been sent (tests, shutdown)."""
    done = threading.Event()
    _queue().put(("", done))  # type: ignore[arg-type]
    done.wait(timeout)


def _queue() -> "queue.SimpleQueue[tuple[str, str]]":
    global _outbox, _outbox_pid
    if _outbox is None or _outbox_pid != os.getpid():  # threads do not survive a fork
        _outbox, _outbox_pid = queue.SimpleQueue(), os.getpid()
        threading.Thread(target=_send, args=(_outbox,), name="conveyor-live", daemon=True).start()
    return _outbox


def _send(outbox: "queue.SimpleQueue[tuple[str, str]]") -> None:
    while True:
        batch = [outbox.get()]
        while not outbox.empty() and len(batch) < 500:
            batch.append(outbox.get())
        markers = [data for name, data in batch if not name]
        try:
            with client().pipeline(transaction=False) as pipe:
                for name, data in batch:
                    if name:
                        pipe.publish(name, data)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("%d live event(s) not published: %s", len(batch) - len(markers), exc)
        for marker in markers:
            marker.set()


@contextmanager
def subscription(job_id: UUID | str) -> Iterator[redis.client.PubSub]:
    pubsub = client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job_id))
    try:
        yield pubsub
    finally:
        pubsub.close()
