"""The reconciler: makes the broker agree with the job table again. Run by beat every few seconds.

- scheduled jobs whose time has come are queued and published;
- running jobs whose heartbeat stopped (their worker died) are run again, or dead-lettered when
  out of attempts, or timed out when past their deadline;
- retrying jobs long past their retry time, and queued jobs long unclaimed while their queue in
  the broker holds fewer messages than that (a publish failed, Redis was flushed or restarted), are
  published again. A duplicate message is harmless: its claim fails.

Every query reads only unfinished jobs through a partial index, so the cost does not grow with
the number of finished jobs.
"""

import logging
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from apps.jobs import lifecycle
from apps.jobs.dispatch import publish_safely
from apps.jobs.kinds import KINDS
from apps.jobs.models import Job, Status

log = logging.getLogger(__name__)

BATCH = 5_000


def broker_depth(queue: str) -> int:
    """Messages waiting in a queue (all priority levels); 0 if the queue does not exist."""
    with current_app.connection_for_read() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except Exception:  # a missing queue: the broker lost it (flushed) or never had it
            return 0


def reconcile() -> dict[str, int]:
    now = timezone.now()
    overdue = now - timedelta(seconds=settings.JOBS_REDISPATCH_GRACE_SECONDS)
    not_recently_redispatched = Q(redispatched_at__isnull=True) | Q(redispatched_at__lt=overdue)
    counts = {"promoted": 0, "recovered": 0, "redispatched": 0}
    to_publish: list[Job] = []

    for job in Job.objects.filter(status=Status.SCHEDULED, run_at__lte=now).order_by("run_at")[:BATCH]:
        if lifecycle.promote(job.pk):
            counts["promoted"] += 1
            to_publish.append(job)

    silent_since = now - timedelta(seconds=settings.JOBS_LEASE_SECONDS)
    for job in Job.objects.filter(status=Status.RUNNING, heartbeat_at__lt=silent_since)[:BATCH]:
        moved_to = lifecycle.recover_lost(job, f"worker lost (no heartbeat for {settings.JOBS_LEASE_SECONDS:g}s)")
        if moved_to:
            counts["recovered"] += 1
        if moved_to == Status.QUEUED:
            to_publish.append(job)

    stuck = list(Job.objects.filter(not_recently_redispatched, status=Status.RETRYING, run_at__lt=overdue)[:BATCH])
    for queue in settings.JOBS_QUEUES:
        kinds = [kind.name for kind in KINDS.values() if kind.queue == queue]
        unclaimed = Job.objects.filter(
            not_recently_redispatched,
            status=Status.QUEUED,
            kind__in=kinds,
            queued_at__lt=overdue,
        )
        count = unclaimed.count()
        if count and count > broker_depth(queue):
            stuck.extend(unclaimed.order_by("queued_at")[:BATCH])
    if stuck:
        lifecycle.mark_redispatched([job.pk for job in stuck])
        counts["redispatched"] = len(stuck)
        log.warning("re-publishing %d job(s) whose message was lost", len(stuck))

    to_publish.extend(stuck)
    if to_publish:
        publish_safely(to_publish)
    return counts
