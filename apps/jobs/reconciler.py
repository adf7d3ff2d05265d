"""The reconciler: makes the broker agree with the job table again. Run in beat's own process (see
`apps.jobs.scheduler`), so that no job, however long, can keep it waiting for a worker slot.

- scheduled jobs whose time has come are queued and published (`promote_due`, several times a
  second, so `run_at` is kept to a fraction of a second);
- running jobs whose lease ran out (their worker died or lost the database) are settled: run again,
  dead-lettered when out of attempts, or timed out when past their deadline;
- queued jobs whose message is gone are published again: a job is judged lost once it has waited
  JOBS_REDISPATCH_GRACE_SECONDS and either its priority's list in the broker is empty, or the
  workers have already claimed jobs of its queue and priority that were published after it (a list
  is first in, first out, so its message would have come first). A job that only waits its turn
  behind a backlog is left alone, and the work is proportional to the lost jobs, not to the backlog;
- retrying jobs long past their retry time (their delayed message is gone) are published again;
- jobs held back by a user concurrency limit that now fit under it are let go (see `fairness`).

A duplicate message is harmless: its claim fails. Leases are judged on the database's clock.
"""

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

from celery import current_app
from django.conf import settings
from django.db.models.functions import Now

from apps.jobs import fairness, lifecycle, live, sql
from apps.jobs.dispatch import broker_priority
from apps.jobs.models import Job, Priority

log = logging.getLogger(__name__)

BATCH = 5_000
# Claims of one queue come from several processes, slightly out of publish order: a job counts as
# passed by the claims only once they are this far beyond it.
CLAIM_ORDER_SLACK_SECONDS = 1.0


def broker_depths(queue: str, conn: object = None) -> dict[str | None, int]:
    """Messages waiting in a queue: per priority on Redis (one list per priority step), as a total
    (key None) on AMQP. A queue the broker does not have counts 0. On `conn` when given (a caller
    that asks of several queues), else on a connection of its own."""
    with nullcontext(conn) if conn is not None else current_app.connection_for_read() as conn:
        channel = conn.default_channel
        if settings.BROKER_IS_REDIS:
            names = {priority: channel._q_for_pri(queue, broker_priority(priority)) for priority in Priority.values}
            with channel.client.pipeline(transaction=False) as pipe:
                for name in names.values():
                    pipe.llen(name)
                return dict(zip(names, pipe.execute(), strict=True))
        try:
            return {None: channel.queue_declare(queue=queue, passive=True).message_count}
        except Exception:  # a missing queue: the broker lost it (a restart) or never had it
            return {None: 0}


def broker_depth(queue: str) -> int:
    """Messages waiting in a queue, over all its priorities."""
    return sum(broker_depths(queue).values())


def promote_due(now: datetime | Now | None = None) -> int:
    """Queue (and publish) the scheduled jobs whose time has come (on the database's clock)."""
    promoted = 0
    for job in Job.objects.due_scheduled(now or Now()).order_by("run_at")[:BATCH]:
        promoted += lifecycle.promote(job)
    return promoted


def lost_messages(now: datetime) -> list[Job]:
    """Queued jobs whose message is no longer in the broker (see the module's docstring)."""
    overdue = now - timedelta(seconds=settings.JOBS_REDISPATCH_GRACE_SECONDS)
    lost: list[Job] = []
    for queue in settings.JOBS_QUEUES:
        waiting = Job.objects.unclaimed(queue)
        if not waiting.published_before(overdue).exists():
            continue
        depths = broker_depths(queue)
        try:
            claimed = live.claimed_up_to(queue)
        except Exception:  # Redis unreachable: judge by the depths alone
            claimed = {}
        for priority in Priority.values:
            depth = depths.get(priority, depths.get(None))
            if depth == 0:
                cutoff = overdue  # nothing waits in its list, yet the job is unclaimed
            elif priority in claimed:
                passed = datetime.fromtimestamp(claimed[priority] - CLAIM_ORDER_SLACK_SECONDS, UTC)
                cutoff = min(overdue, passed)
            else:
                continue  # messages wait and nothing was claimed yet: nothing can be judged
            lost += waiting.filter(priority=priority).published_before(cutoff).order_by("queued_at")[:BATCH]
    return lost


def recover_silent(now: datetime) -> int:
    lease = settings.JOBS_LEASE_SECONDS
    recovered = 0
    for job in Job.objects.silent_running(now - timedelta(seconds=lease))[:BATCH]:
        recovered += bool(lifecycle.recover_lost(job, f"worker lost (no heartbeat for {lease:g}s)", now))
    return recovered


def reconcile() -> dict[str, int]:
    now = sql.db_now()
    counts = {"promoted": promote_due(now), "recovered": recover_silent(now), "redispatched": 0}
    grace = timedelta(seconds=settings.JOBS_REDISPATCH_GRACE_SECONDS)
    stale: Sequence[Job] = [*lost_messages(now), *Job.objects.stuck_retrying(now - grace)[:BATCH]]
    if stale:
        log.warning("re-publishing %d job(s) whose message was lost", len(stale))
        lifecycle.redispatch(list(stale))
        counts["redispatched"] = len(stale)
    counts["released"] = fairness.release_stranded()
    return counts
