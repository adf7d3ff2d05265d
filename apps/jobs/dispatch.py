"""Publishing jobs to Celery. A message carries the job id only; the row carries everything else.

`apps.jobs` never imports worker code: it sends the task by its stable name.
"""

import logging
from collections.abc import Sequence

from celery import current_app
from django.conf import settings
from django.db import transaction

from apps.jobs.callbacks import DELIVER_CALLBACK
from apps.jobs.kinds import get_kind
from apps.jobs.models import Job, Priority

log = logging.getLogger(__name__)

RUN_JOB = "conveyor.run_job"
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


def publish(jobs: Sequence[Job], *, countdown: float | None = None) -> None:
    """Send one message per job over one broker connection. Raises if the broker is unreachable."""
    app = current_app
    grace = settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS
    # kombu pipelines the publishes of a batch on Redis (one round trip per PUBLISH_BATCH messages);
    # other transports publish each message at once.
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
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


def publish_safely(jobs: Sequence[Job], *, countdown: float | None = None) -> bool:
    """Publish, and on a broker failure leave the jobs to the reconciler: their rows are already safe."""
    try:
        publish(jobs, countdown=countdown)
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
