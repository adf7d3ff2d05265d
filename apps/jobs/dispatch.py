"""Publishing jobs to Celery. A message carries the job id only; the row carries everything else.

`apps.jobs` never imports worker code: it sends the task by its stable name.
"""

import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import urlparse
from weakref import WeakKeyDictionary

import redis
from celery import Celery, current_app
from django.conf import settings
from django.db import transaction
from kombu.entity import PERSISTENT_DELIVERY_MODE as DELIVERY_MODE
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from apps.jobs.kinds import get_kind
from apps.jobs.models import Job, Priority

log = logging.getLogger(__name__)

RUN_JOB = "conveyor.run_job"
DELIVER_CALLBACK = "conveyor.deliver_callback"  # delivered by tasks/callbacks.py
# The worker control command that stops a cancelled job's running attempt (tasks/entrypoints.py).
CANCEL_COMMAND = "conveyor_cancel"
PUBLISH_BATCH = 500

# Redis serves priority 0 first; AMQP serves the highest number first.
REDIS_PRIORITY = {
    Priority.CRITICAL: 0,
    Priority.HIGH: 3,
    Priority.NORMAL: 6,
    Priority.LOW: 9,
}
AMQP_PRIORITY = {
    Priority.CRITICAL: 9,
    Priority.HIGH: 6,
    Priority.NORMAL: 3,
    Priority.LOW: 0,
}


def broker_priority(priority: str) -> int:
    return (REDIS_PRIORITY if settings.BROKER_IS_REDIS else AMQP_PRIORITY)[priority]


def queue_for(job: Job) -> str:
    return get_kind(job.kind).queue


def publish(
    jobs: Sequence[Job], *, countdown: float | None = None, front: bool = False, app: Celery | None = None
) -> None:
    """Send one message per job over one broker connection. Raises if the broker is unreachable.

    `front`: at the head of their priority's list (Redis), where a message that was lost should have
    been; it is taken before the jobs published after it.
    """
    app = app or current_app
    if not jobs:
        return
    if settings.BROKER_IS_REDIS and countdown is None:
        _publish_redis(jobs, app, front)
    else:
        _publish_celery(jobs, app, countdown)


def _publish_celery(jobs: Sequence[Job], app: Celery, countdown: float | None = None) -> None:
    grace = settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(
                RUN_JOB,
                args=[str(job.pk)],
                queue=queue_for(job),
                priority=broker_priority(job.priority),
                soft_time_limit=job.timeout_seconds,
                time_limit=job.timeout_seconds + grace,
                countdown=countdown,
                producer=producer,
            )


def _publish_redis(jobs: Sequence[Job], app: Celery, front: bool = False) -> None:
    """The messages `send_task` would send, built from one template and pipelined to Redis.

    `send_task` spends about 200 µs of Python per message (routing, signals, building the headers,
    kombu's serializer registry), and kombu builds a new Redis client for every publish: a batch of
    thousands made publishing the slowest part of a submission, and a single job's publish about a
    fifth of its pickup latency. Here Celery builds the message once per process (`as_task_v2`), each
    job's copy changes only what differs (ids, time limits, priority, queue), kombu's Redis channel
    wraps it as it wraps any message (`prepare_message`, `_inplace_augment_message`) and names its
    priority list (`_q_for_pri`), and one kept client on the channel's connection pool pushes them,
    PUBLISH_BATCH per round trip. `tests/test_dispatch.py` pins the result to what `send_task`
    stores, field by field. Not sent: the `before/after_task_publish` signals and the `task-sent`
    event (off by default).
    """
    grace = settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS
    headers, properties, body = _template(app, app.thread_oid, os.getpid())
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        with _client_for(channel.pool).pipeline(transaction=False) as pipe:
            for number, job in enumerate(jobs, 1):
                task_id, job_id, queue = uuid(), str(job.pk), queue_for(job)
                priority = broker_priority(job.priority)
                message = channel.prepare_message(
                    dumps(([job_id], *body[1:])),
                    priority,
                    "application/json",
                    "utf-8",
                    {
                        **headers,
                        "id": task_id,
                        "root_id": task_id,
                        "argsrepr": repr([job_id]),  # what saferepr gives for a list of one string
                        "timelimit": [job.timeout_seconds + grace, job.timeout_seconds],
                    },
                    {**properties, "correlation_id": task_id, "delivery_mode": DELIVERY_MODE},
                )
                channel._inplace_augment_message(message, "", queue)
                # Workers take from the right end (BRPOP): the left is the back of the line.
                push = pipe.rpush if front else pipe.lpush
                push(channel._q_for_pri(queue, priority), dumps(message))
                if number % PUBLISH_BATCH == 0:
                    pipe.execute()
            pipe.execute()


@lru_cache(maxsize=32)
def _template(app: Celery, reply_to: str, pid: int) -> tuple[dict, dict, tuple]:
    """The parts of a run_job message that are the same for every job sent by this process and
    thread (the sender's name and reply address)."""
    message = app.amqp.as_task_v2("", RUN_JOB, args=[""], reply_to=reply_to, ignore_result=None)
    return message.headers, message.properties, message.body


_clients: "WeakKeyDictionary[redis.ConnectionPool, redis.Redis]" = WeakKeyDictionary()


def _client_for(pool: redis.ConnectionPool) -> redis.Redis:
    if pool not in _clients:
        _clients[pool] = redis.Redis(connection_pool=pool)
    return _clients[pool]


def publish_safely(jobs: Sequence[Job], *, countdown: float | None = None, front: bool = False) -> bool:
    """Publish, and on a broker failure leave the jobs to the reconciler: their rows are already safe."""
    try:
        publish(jobs, countdown=countdown, front=front)
    except Exception:
        log.exception(
            "could not publish %d job(s); the reconciler will re-publish them",
            len(jobs),
        )
        return False
    return True


def publish_on_commit(jobs: Sequence[Job]) -> None:
    """Publish once the surrounding transaction commits, so no worker looks for a row not yet there."""
    jobs = [job for job in jobs if job.status == Job.Status.QUEUED]
    if jobs:
        transaction.on_commit(lambda: publish_safely(jobs))


def publish_callback_on_commit(job: Job) -> None:
    """Once the job's final state is committed, have a worker POST it to the job's callback URL.

    A broker failure is logged, not raised: the job's outcome is already committed and stays readable.
    """
    if job.callback_url:
        transaction.on_commit(lambda: _publish_callback(job))


def _publish_callback(job: Job) -> None:
    try:
        current_app.send_task(
            DELIVER_CALLBACK, args=[str(job.pk)], queue="default", priority=broker_priority(Priority.HIGH)
        )
    except Exception:
        log.exception("could not publish the callback of job %s", job.pk)


def callback_host_allowed(url: str) -> bool:
    """Whether a job may call `url` back: its host is in CALLBACK_ALLOWED_HOSTS. Checked at submission
    (the serializer) and again at delivery (`tasks.callbacks`)."""
    allowed = settings.CALLBACK_ALLOWED_HOSTS
    host = urlparse(url).hostname or ""
    return "*" in allowed or host.lower() in (h.lower() for h in allowed)
