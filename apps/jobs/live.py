"""Live job events over Redis pub/sub: status changes, progress, log output, partial AI text.

Publishing is fire-and-forget. Each process keeps one Redis connection on which it sends commands
without waiting for their replies: a job pays for one socket write per event, not a round trip, and
replies are read (and any error logged) later, a batch at a time, once they have arrived. A Redis failure
never fails a job: events are dropped, a warning is logged once, and publishing pauses for a few
seconds before it connects again, so an unreachable Redis cannot slow every job down. A subscriber
that missed something reads it back from the job row and the stored log, and an AI job's text so
far from a Redis key kept beside its events (`publish_text`, `text_so_far`).
"""

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from apps.jobs.statuses import LiveEvent
from project.processes import per_process

log = logging.getLogger(__name__)

TEXT_TTL_SECONDS = 3600
# How long publishing pauses after Redis failed, and how long a connect or a write may take.
PAUSE_SECONDS = 5.0
SOCKET_TIMEOUT_SECONDS = 1.0
# Replies (PUBLISH answers a count, a refused command an error) are read once this many are due:
# few enough that they never fill a socket buffer, and no read attempt for each event.
READ_REPLIES_AFTER = 64


@per_process
def client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, health_check_interval=30)


def channel(job_id: UUID | str) -> str:
    return f"conveyor:job:{job_id}"


def publish(job_id: UUID | str, event: dict[str, Any]) -> None:
    _publisher().send(("PUBLISH", channel(job_id), json.dumps(event, default=str)))


def text_key(job_id: UUID | str, attempt: int) -> str:
    return f"conveyor:text:{job_id}:{attempt}"


def publish_text(job_id: UUID | str, attempt: int, offset: int, delta: str) -> None:
    """A piece of an attempt's generated text, starting at byte `offset` of it: kept (so a subscriber
    arriving late reads what came before, see `text_so_far`), then published as a `text` event."""
    key = text_key(job_id, attempt)
    commands = [("APPEND", key, delta)]
    if offset == 0:  # APPEND keeps the key's expiry: set once, beyond the longest job
        commands.append(("EXPIRE", key, settings.JOBS_MAX_TIMEOUT_SECONDS + TEXT_TTL_SECONDS))
    event = {"type": LiveEvent.TEXT, "attempt": attempt, "offset": offset, "delta": delta}
    commands.append(("PUBLISH", channel(job_id), json.dumps(event)))
    _publisher().send(*commands)


# The reconciler's view of each queue: per priority, the latest publish time of a job a worker has
# claimed. Kept as a maximum (claims of one queue come from several processes, slightly out of order).
CLAIMED_KEY = "conveyor:claimed:{queue}"
_KEEP_MAX = (
    "local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') "
    "if tonumber(ARGV[2]) > v then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
)


def record_claimed(queue: str, priority: str, published_at: float) -> None:
    _publisher().send(("EVAL", _KEEP_MAX, 1, CLAIMED_KEY.format(queue=queue), priority, repr(published_at)))


def claimed_up_to(queue: str) -> dict[str, float]:
    """Per priority, the latest publish time of a job of `queue` that a worker claimed."""
    values = client().hgetall(CLAIMED_KEY.format(queue=queue))
    return {key.decode(): float(value) for key, value in values.items()}


def text_so_far(job_id: UUID | str, attempt: int) -> str:
    return (client().get(text_key(job_id, attempt)) or b"").decode("utf-8", "replace")


class Publisher:
    """Sends Redis commands on one connection without waiting for their replies. Thread-safe: the
    commands of one process reach Redis in the order they were sent."""

    def __init__(self, url: str) -> None:
        self._pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,  # a health check would read a reply that belongs to a command
        )
        self._lock = threading.Lock()
        self._connection: redis.connection.AbstractConnection | None = None
        self._unread = 0  # replies not read yet
        self._paused_until = 0.0
        self._dropped = 0

    def send(self, *commands: tuple[Any, ...]) -> None:
        with self._lock:
            if self._paused_until and time.monotonic() < self._paused_until:
                self._dropped += len(commands)
                return
            try:
                connection = self._connect()
                if self._unread >= READ_REPLIES_AFTER:
                    self._read_arrived_replies(connection)
                connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                self._unread += len(commands)
            except (redis.RedisError, OSError) as exc:
                self._failed(exc, len(commands))

    def _connect(self) -> "redis.connection.AbstractConnection":
        if self._connection is None:
            self._connection, self._unread, self._paused_until = self._pool.get_connection(), 0, 0.0
            if self._dropped:
                log.warning("live events: Redis reachable again; %d command(s) were dropped", self._dropped)
                self._dropped = 0
        return self._connection

    def _read_arrived_replies(self, connection: "redis.connection.AbstractConnection") -> None:
        while self._unread and connection.can_read(timeout=0):
            self._unread -= 1
            try:
                connection.read_response()
            except redis.ResponseError as exc:  # one command refused (say, Redis out of memory)
                log.warning("live events: Redis refused a command: %s", exc)

    def _failed(self, exc: Exception, count: int) -> None:
        if self._connection is not None:
            self._connection.disconnect()
            self._pool.release(self._connection)
        self._connection = None
        if not self._dropped:  # once per outage
            log.warning("live events: Redis unreachable (%s); dropping them, retrying every %.0f s", exc, PAUSE_SECONDS)
        self._dropped += count
        self._paused_until = time.monotonic() + PAUSE_SECONDS


@per_process
def _publisher() -> Publisher:
    return Publisher(settings.REDIS_URL)


@contextmanager
def subscription(job_id: UUID | str) -> Iterator[redis.client.PubSub]:
    pubsub = client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job_id))
    try:
        yield pubsub
    finally:
        pubsub.close()
