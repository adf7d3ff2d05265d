"""Live job events for Server-Sent Events streams, served without a thread per stream.

Every open stream of a web process is an asyncio task waiting on a queue. One `Hub` per process (per
event loop) holds one Redis connection, subscribes to a job's channel while someone listens to it,
and hands each message to the queues of that job's listeners. Database reads (the job row, the
stored log) run in Django's thread for synchronous code, briefly; a stream holds no thread while it
waits. A stream that could have missed events (Redis reconnected, its queue overflowed, or its job's
status changed without the event coming: the hub checks every watched job in one query at each
keepalive) reads the job row again.

Open streams are counted per user in Redis (a sorted set of stream ids whose scores are expiries,
renewed at each keepalive), so that JOBS_MAX_STREAMS_PER_USER holds across web processes and a
process that died leaves nothing counted for long.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from apps.jobs import live, logs
from apps.jobs.models import Job
from apps.jobs.statuses import LiveEvent

log = logging.getLogger(__name__)

LOG_PAGE_BYTES = 256 * 1024
KEEPALIVE_SECONDS = 15.0
QUEUE_SIZE = 1000  # events a stream may fall behind before it is told to read the row again
RESYNC = {"type": LiveEvent.RESYNC}  # not sent to clients: the stream reads the job row again
STREAMS_KEY = "conveyor:streams:{user}"
STREAM_TTL_SECONDS = 3 * KEEPALIVE_SECONDS
T = TypeVar("T")

# Admit a stream if the user has fewer than ARGV[3] live ones: expired entries (a dead process's)
# are dropped first; the new one expires at ARGV[2] unless renewed.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass(eq=False)
class Listener:
    """One open stream, as its hub knows it."""

    job_id: object
    user_id: int
    stream_id: str
    status: str = ""  # the job's status as the stream last read it
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_SIZE))


class Hub:
    """The Redis subscriptions of one event loop, fanned out to the streams that listen, and the
    streams' shared chores: every KEEPALIVE_SECONDS one query for the status of every watched job
    (a stream whose job changed without its event having come is told to read its row again), and
    one Redis round trip that renews every open stream's place in its user's count."""

    def __init__(self) -> None:
        self._client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, health_check_interval=30)
        self._pubsub: aioredis.client.PubSub | None = None
        self._listeners: dict[str, set[Listener]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @asynccontextmanager
    async def listen(self, job_id: object, user_id: int, stream_id: str) -> AsyncIterator[Listener]:
        channel = live.channel(job_id)
        listener = Listener(job_id, user_id, stream_id)
        async with self._lock:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            if channel not in self._listeners:
                self._listeners[channel] = set()
                await self._pubsub.subscribe(channel)
            self._listeners[channel].add(listener)
            loop = asyncio.get_running_loop()
            if self._reader is None or self._reader.done():
                self._reader = loop.create_task(self._read())
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = loop.create_task(self._sweep())
        try:
            yield listener
        finally:
            async with self._lock:
                listeners = self._listeners.get(channel, set())
                listeners.discard(listener)
                if not listeners and channel in self._listeners:
                    del self._listeners[channel]
                    with contextlib.suppress(aioredis.RedisError, OSError):  # gone with its connection
                        await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while self._listeners:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (aioredis.RedisError, OSError) as exc:
                await self._reconnect(exc)
                continue
            if not message or message.get("type") != "message":
                continue
            channel = message["channel"].decode()
            try:
                event = json.loads(message["data"])
            except ValueError:
                continue
            for listener in list(self._listeners.get(channel, ())):
                _offer(listener.queue, dict(event))

    async def _sweep(self) -> None:
        while self._listeners:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            listeners = [listener for group in list(self._listeners.values()) for listener in group]
            if not listeners:
                return
            try:
                statuses = await _statuses({listener.job_id for listener in listeners})
                for listener in listeners:
                    if statuses.get(str(listener.job_id)) != listener.status:
                        _offer(listener.queue, RESYNC)
            except Exception:
                log.exception("event streams: could not read the watched jobs' statuses")
            expiry = time.time() + STREAM_TTL_SECONDS
            by_user: dict[int, dict[str, float]] = {}
            for listener in listeners:
                by_user.setdefault(listener.user_id, {})[listener.stream_id] = expiry
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for user_id, entries in by_user.items():  # one command per user
                        pipe.zadd(STREAMS_KEY.format(user=user_id), entries)
                    await pipe.execute()
            except (aioredis.RedisError, OSError):
                pass  # Redis away: counted streams expire, and streams are admitted afresh once it is back

    async def _reconnect(self, exc: Exception) -> None:
        """Subscribe again on a new connection; every listener may have missed events meanwhile."""
        log.warning("event streams: Redis connection lost (%s); subscribing again", exc)
        await asyncio.sleep(1.0)
        async with self._lock:
            old, self._pubsub = self._pubsub, self._client.pubsub(ignore_subscribe_messages=True)
            if old is not None:
                with contextlib.suppress(aioredis.RedisError, OSError):
                    await old.aclose()
            try:
                if self._listeners:
                    await self._pubsub.subscribe(*self._listeners)
            except (aioredis.RedisError, OSError):
                return  # still away: the next read fails and brings us back here
            for group in self._listeners.values():
                for listener in group:
                    _offer(listener.queue, RESYNC)


def _offer(queue: asyncio.Queue, event: dict) -> None:
    if queue.full():  # a stream that cannot keep up reads the row again instead
        while not queue.empty():
            queue.get_nowait()
        event = RESYNC
    queue.put_nowait(event)


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """This event loop's hub (an ASGI server runs one loop per process)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = Hub()
    return _hubs[loop]


# --- admission -------------------------------------------------------------------------------------


async def admit(user_id: int) -> str | None:
    """A stream id if the user may open one more stream, else None."""
    stream_id = uuid.uuid4().hex
    now = time.time()
    admitted = await hub().client.eval(
        _ADMIT, 1, STREAMS_KEY.format(user=user_id), now, now + STREAM_TTL_SECONDS,
        settings.JOBS_MAX_STREAMS_PER_USER, stream_id, int(STREAM_TTL_SECONDS * 2),
    )  # fmt: skip
    return stream_id if admitted else None


async def release(user_id: int, stream_id: str) -> None:
    with contextlib.suppress(aioredis.RedisError, OSError):  # else it expires by itself
        await hub().client.zrem(STREAMS_KEY.format(user=user_id), stream_id)


# --- the events of one stream ----------------------------------------------------------------------


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _snapshot(job: Job) -> dict:
    return {name: getattr(job, name) for name in ("status", "progress", "progress_message", "result", "error")}


# The database, from a few threads of this module's own (not Django's thread per request, which an
# open stream would hold, with its connection, for as long as it is open).
_database = ThreadPoolExecutor(max_workers=4, thread_name_prefix="streams-db")


def in_database_thread(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    def call(*args: object, **kwargs: object) -> T:
        close_old_connections()  # a connection that died, or is past its age, is replaced
        return fn(*args, **kwargs)

    return sync_to_async(call, thread_sensitive=False, executor=_database)


_refresh = in_database_thread(lambda job: job.refresh_from_db() or job)
_read_log = in_database_thread(logs.read)
_statuses = in_database_thread(
    lambda ids: {str(pk): status for pk, status in Job.objects.filter(pk__in=list(ids)).values_list("pk", "status")}
)


async def job_events(job: Job, offset: int, user_id: int, stream_id: str) -> AsyncIterator[str]:
    """`status` first, the stored log from `offset`, an AI job's text so far, then live `log`,
    `progress`, `status` and `text` events until the job is final: then `end` with its last state."""
    try:
        # Subscribed before anything is read: nothing falls between.
        async with hub().listen(job.pk, user_id, stream_id) as listener:
            job = await _refresh(job)
            listener.status = job.status
            yield sse(LiveEvent.STATUS, _snapshot(job))
            while True:
                text, end = await _read_log(job, offset, LOG_PAGE_BYTES)
                if not text:
                    break
                yield sse(LiveEvent.LOG, {"offset": offset, "text": text})
                offset = end
            # (attempt, bytes) of generated text already sent; a live piece starting before that is not new.
            text_sent = (job.attempts, 0)
            if job.kind == "ai_generate" and job.status == Job.Status.RUNNING:
                kept = await hub().client.get(live.text_key(job.pk, job.attempts))
                so_far = (kept or b"").decode("utf-8", "replace")
                if so_far:
                    yield sse(LiveEvent.TEXT, {"attempt": job.attempts, "offset": 0, "delta": so_far})
                    text_sent = (job.attempts, len(so_far.encode()))
            while not job.is_final:
                try:
                    event = await asyncio.wait_for(listener.queue.get(), timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keepalive\n\n"  # (the hub looks after missed events and the stream count)
                    continue
                kind = event.pop("type", "message")
                if kind == LiveEvent.RESYNC:
                    job = await _refresh(job)
                    listener.status = job.status
                    continue
                if kind == LiveEvent.LOG:
                    if event["offset"] < offset:
                        continue  # already sent from the stored log
                    offset = event["offset"] + len(event["text"].encode())
                elif kind == LiveEvent.TEXT and event["attempt"] == text_sent[0] and event["offset"] < text_sent[1]:
                    continue  # already sent with the text so far
                yield sse(kind, event)
                if kind == LiveEvent.STATUS:
                    job = await _refresh(job)
                    listener.status = job.status
            yield sse(LiveEvent.END, _snapshot(job))
    finally:
        await release(user_id, stream_id)


async def until_final(job: Job, user_id: int, seconds: float) -> Job:
    """`job` once final, or as it stands after `seconds` (`?wait=`): woken by its live status events,
    counted as one of the user's open streams (when the user has none left, it answers at once)."""
    stream_id = await admit(user_id)
    if stream_id is None:
        return await _refresh(job)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        async with hub().listen(job.pk, user_id, stream_id) as listener:  # subscribed before the read
            job = await _refresh(job)
            while not job.is_final and (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(listener.queue.get(), timeout=min(left, KEEPALIVE_SECONDS))
                except TimeoutError:
                    job = await _refresh(job)  # (a status event lost with Redis: read the row now and then)
                    continue
                if event.get("type") in (LiveEvent.STATUS, LiveEvent.RESYNC):
                    job = await _refresh(job)
    finally:
        await release(user_id, stream_id)
    return job
