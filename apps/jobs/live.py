"""Live job events over Redis pub/sub: status changes, progress, log output, partial AI text.

Publishing is fire-and-forget: events go through an in-process queue to a background thread, so a
job never waits for Redis on its way (a transition, a token), and a Redis failure never fails a job.
A subscriber that missed something reads it back from the job row and the stored log, and an AI
job's text so far from a Redis key kept beside its events (`publish_text`, `text_so_far`).
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
# Redis commands to send, in order: ("publish", channel, data), ("append", key, text), ...
Command = tuple[str, ...]
_outbox: "queue.SimpleQueue[Command] | None" = None
TEXT_TTL_SECONDS = 3600
_outbox_lock = threading.Lock()


def client() -> redis.Redis:
    global _client
    if _client is None:  # redis-py's pool reconnects by itself after a fork
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)
    return _client


def channel(job_id: UUID | str) -> str:
    return f"conveyor:job:{job_id}"


def publish(job_id: UUID | str, event: dict[str, Any]) -> None:
    _queue().put(("publish", channel(job_id), json.dumps(event, default=str)))


def text_key(job_id: UUID | str, attempt: int) -> str:
    return f"conveyor:text:{job_id}:{attempt}"


def publish_text(job_id: UUID | str, attempt: int, offset: int, delta: str) -> None:
    """A piece of an attempt's generated text, starting at byte `offset` of it: kept (so a subscriber
    arriving late reads what came before, see `text_so_far`), then published as a `text` event."""
    key = text_key(job_id, attempt)
    outbox = _queue()
    outbox.put(("append", key, delta))
    if offset == 0:  # APPEND keeps the key's expiry: set once, beyond the longest job
        outbox.put(("expire", key, str(settings.JOBS_MAX_TIMEOUT_SECONDS + TEXT_TTL_SECONDS)))
    outbox.put(
        ("publish", channel(job_id), json.dumps({"type": "text", "attempt": attempt, "offset": offset, "delta": delta}))
    )


def text_so_far(job_id: UUID | str, attempt: int) -> str:
    return (client().get(text_key(job_id, attempt)) or b"").decode("utf-8", "replace")


def _queue() -> "queue.SimpleQueue[Command]":
    global _outbox
    if _outbox is None:
        with _outbox_lock:  # one sender per process, so events keep their order
            if _outbox is None:
                outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
                threading.Thread(target=_send, args=(outbox,), name="conveyor-live", daemon=True).start()
                _outbox = outbox
    return _outbox


def _after_fork_in_child() -> None:
    # The sender thread does not survive a fork, and the lock may have been held when it happened.
    global _outbox, _outbox_lock
    _outbox, _outbox_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _send(outbox: "queue.SimpleQueue[Command]") -> None:
    while True:
        batch = [outbox.get()]
        while not outbox.empty() and len(batch) < 500:
            batch.append(outbox.get())
        try:
            with client().pipeline(transaction=False) as pipe:
                for command, *args in batch:
                    getattr(pipe, command)(*args)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("%d live event command(s) not sent: %s", len(batch), exc)


@contextmanager
def subscription(job_id: UUID | str) -> Iterator[redis.client.PubSub]:
    pubsub = client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job_id))
    try:
        yield pubsub
    finally:
        pubsub.close()
