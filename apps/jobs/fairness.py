"""Fair share: at most JOBS_USER_CONCURRENCY running jobs per user in a queue, so that one user's
backlog of ten thousand jobs does not starve another user's single job (Sidekiq's and BullMQ's group
limits, Oban's partitioned queues).

A job over its owner's cap is *held*: queued in the table (`held_at` set), but not published. The
broker then holds at most the cap of each user's jobs, so another user's job is never behind a
backlog in a list, only behind a few jobs of each user. When one of the owner's jobs of that queue
stops running, the next held one (by priority, then the order it was held in) is let go: published.

- On submission (and when a scheduled job comes due, or a job is replayed): a job is let go only if
  its owner has fewer than the cap running or on their way in its queue, and none held already (a
  new job does not overtake older held ones).
- On claim, the cap is checked again under a lock per owner and queue (two submissions racing, or a
  retry's delayed message, may have let one too many go): a claim over the cap holds the job instead.
- The reconciler lets go whatever a lost release left held (a worker killed after its job ended),
  and everything held once the cap is lifted.
"""

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from apps.jobs.dispatch import publish_safely
from apps.jobs.models import Job, Priority, Status

log = logging.getLogger(__name__)

ORDER = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]
HELD_STATUSES = (Status.QUEUED, Status.RETRYING)
RELEASE_BATCH = 1_000  # jobs let go at once (when the cap is lifted, say)


def enabled() -> bool:
    return any(settings.JOBS_USER_CONCURRENCY.values())


def cap(queue: str) -> int:
    """The cap of `queue` (0: none)."""
    caps = settings.JOBS_USER_CONCURRENCY
    return caps.get(queue, caps.get("*", 0))


def _lock(owner_id: int, queue: str) -> None:
    """Serialise, until the transaction ends, the claims and releases of one owner's jobs of a queue."""
    digest = hashlib.blake2b(f"user-concurrency:{owner_id}:{queue}".encode(), digest_size=8).digest()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int.from_bytes(digest, "big", signed=True)])


def running(owner_id: int, queue: str) -> int:
    return Job.objects.filter(owner_id=owner_id, status=Status.RUNNING, queue=queue).count()


def _busy(owner_id: int, queue: str) -> int:
    """The owner's jobs of `queue` running, or queued and let go (on their way to a worker)."""
    on_their_way = Job.objects.filter(owner_id=owner_id, queue=queue, status=Status.QUEUED, held_at__isnull=True)
    return running(owner_id, queue) + on_their_way.count()


def _held(owner_id: int, queue: str) -> Any:
    return Job.objects.filter(owner_id=owner_id, queue=queue, status__in=HELD_STATUSES, held_at__isnull=False)


def admit(jobs: Iterable[Job]) -> list[Job]:
    """Of jobs about to be queued, hold (set `held_at` on) those over their owner's cap; returns the
    ones to publish (all of them, without a query, when no queue has a cap)."""
    if not enabled():
        return list(jobs)
    groups: dict[tuple[int, str], list[Job]] = defaultdict(list)
    admitted: list[Job] = []
    for job in jobs:
        if cap(job.queue):
            groups[(job.owner_id, job.queue)].append(job)
        else:
            admitted.append(job)
    now = timezone.now()
    for (owner_id, queue), waiting in groups.items():
        room = 0 if _held(owner_id, queue).exists() else max(0, cap(queue) - _busy(owner_id, queue))
        for job in waiting:
            if room > 0:
                room -= 1
                job.held_at = None
                admitted.append(job)
            else:
                job.held_at = now
    return admitted


def claim_within_cap(job_id: UUID | str, claim: Any) -> Job | None:
    """Run `claim()` (the lifecycle's claim of `job_id`) only if the owner is under the cap of the
    job's queue; else hold the job (it is published again when a slot frees) and return None."""
    with transaction.atomic():
        row = Job.objects.filter(pk=job_id, status__in=HELD_STATUSES).values_list("owner_id", "queue").first()
        if row is None:
            return None
        owner_id, queue = row
        limit = cap(queue)
        if limit:
            _lock(owner_id, queue)
            if running(owner_id, queue) >= limit:
                due = Job.objects.filter(pk=job_id, status__in=HELD_STATUSES, held_at__isnull=True)
                due.exclude(run_at__gt=Now()).update(held_at=Now())
                return None
        return claim()


def release(owner_id: int, queue: str) -> int:
    """Let go of the owner's held jobs of `queue` that fit under the cap now (all of them, in batches,
    when the queue has no cap). Returns how many were published."""
    limit = cap(queue)
    if not _held(owner_id, queue).exists():  # the common case: nothing waits (the job_held index)
        return 0
    with transaction.atomic():
        _lock(owner_id, queue)
        room = max(0, limit - _busy(owner_id, queue)) if limit else RELEASE_BATCH
        chosen: list[Job] = []
        for priority in ORDER:
            if len(chosen) >= room:
                break
            held = _held(owner_id, queue).filter(priority=priority).order_by("held_at")
            chosen += held.select_for_update(skip_locked=True)[: room - len(chosen)]
        if not chosen:
            return 0
        now = timezone.now()
        Job.objects.filter(pk__in=[job.pk for job in chosen]).update(held_at=None, redispatched_at=now)
        for job in chosen:
            job.held_at, job.redispatched_at = None, now
        transaction.on_commit(lambda: publish_safely(chosen))
    return len(chosen)


def release_after(job: Job) -> None:
    """Once the transaction that took `job` off running commits, let its owner's next job go."""
    if enabled():

        def let_go() -> None:
            try:
                release(job.owner_id, job.queue)
            except Exception:  # the reconciler lets it go instead
                log.warning("could not release held jobs of user %s in %s", job.owner_id, job.queue, exc_info=True)

        transaction.on_commit(let_go)


def release_stranded() -> int:
    """The reconciler's part: release every owner and queue with held jobs (a release lost with its
    worker, a cap lowered or lifted). Cheap when nothing is held (the `job_held` index)."""
    pairs = (
        Job.objects.filter(status__in=HELD_STATUSES, held_at__isnull=False).values_list("owner_id", "queue").distinct()
    )
    return sum(release(owner_id, queue) for owner_id, queue in pairs)


def reason(job: Job) -> str:
    """Why a held job waits."""
    limit = cap(job.queue)
    now = running(job.owner_id, job.queue)
    if not limit:
        return f"held back by a user concurrency limit since lifted; let go within seconds (queue {job.queue})"
    return f"user concurrency limit: {now} of {limit} of the owner's jobs running in queue {job.queue}"
