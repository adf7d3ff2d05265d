"""Celery beat's scheduler, which also keeps the job table and the broker in step, in beat's own
process: scheduled jobs are promoted within a fraction of a second of their `run_at`, and the
reconciler runs every JOBS_RECONCILE_INTERVAL_SECONDS, however busy the workers are (a Celery task
would wait for a free worker slot, behind the very jobs it is meant to look after).

`CELERY_BEAT_SCHEDULER` names it, so `celery -A project beat` runs it. Two beats running by mistake
are harmless to jobs: every transition is conditional, and a duplicate message finds its job claimed.

Its schedule is django-celery-beat's (the database, edited in the admin): periodic jobs
(`apps.jobs.periodic`) are submitted here, in beat's process, at their period's time; any other
periodic task is sent to the workers as Celery's beat sends it.
"""

import logging
import time
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, close_old_connections, connection
from django_celery_beat.schedulers import DatabaseScheduler

from apps.jobs import periodic, reconciler, retention, stats

log = logging.getLogger(__name__)

PROMOTE_INTERVAL_SECONDS = 0.2  # how often due scheduled jobs are looked for (one indexed query)


class JobsMixin:
    """Runs the job platform's periodic work between beat's own ticks."""

    _next_reconcile = 0.0
    _next_prune = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            wait = super().tick(*args, **kwargs)
        except (DatabaseError, InterfaceError):
            # django-celery-beat reads its schedule from the database: while that is away, beat
            # keeps its last schedule and tries again, instead of exiting.
            log.warning("reading the periodic schedule failed; trying again", exc_info=True)
            connection.close()
            wait = PROMOTE_INTERVAL_SECONDS
        self.keep_jobs_in_step()
        return min(wait, PROMOTE_INTERVAL_SECONDS)

    def keep_jobs_in_step(self) -> None:
        close_old_connections()  # honours CONN_MAX_AGE and drops a connection a restart broke
        now = time.monotonic()
        try:
            if now >= self._next_reconcile:
                self._next_reconcile = now + settings.JOBS_RECONCILE_INTERVAL_SECONDS
                counts = reconciler.reconcile()
                if any(counts.values()):
                    log.info("reconciler: %s", counts)
                    stats.record_reconcile(counts)
                stats.rollup()
            else:
                reconciler.promote_due()
            if now >= self._next_prune:
                pruned = retention.prune()
                # a run out of time goes on at the next tick but one; else at the next interval
                again = 1.0 if pruned.get("unfinished_runs") else settings.JOBS_PRUNE_INTERVAL_SECONDS
                self._next_prune = now + again
        except Exception:
            # The database or the broker is away: try again at the next tick, on a new connection.
            log.exception("keeping jobs in step failed; trying again")
            connection.close()


class TemplatesMixin:
    """Submits periodic jobs' templates in beat's process, and keeps their entries on their periods'
    boundaries (an interval of Celery's beat counts from when it last ran, and drifts)."""

    def enabled_models_qs(self) -> Any:
        """django-celery-beat leaves out crontabs whose hour is more than two hours away (to keep
        its heap small); a template's must stay, or a period missed while beat was down would run a
        day late."""
        templates = self.Model.objects.enabled().filter(task=periodic.RUN_TEMPLATE)
        return super().enabled_models_qs() | templates

    def reserve(self, entry: Any) -> Any:
        new_entry = super().reserve(entry)
        if new_entry.task == periodic.RUN_TEMPLATE and new_entry.model.interval_id:
            # an interval's next run counts from its period's start, not from when beat woke
            period = periodic.period_of(new_entry.model, new_entry.last_run_at)
            if period is not None and period > entry.last_run_at:
                new_entry.last_run_at = new_entry.model.last_run_at = period
        return new_entry

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task != periodic.RUN_TEMPLATE:
            return super().apply_async(entry, producer, advance, **kwargs)
        if advance:
            entry = self.reserve(entry)
        close_old_connections()
        try:
            periodic.run(*entry.args)
        except Exception:
            log.exception("periodic job %s could not be submitted; at its next period, or beat's restart", entry.name)
            connection.close()
        return None


class Scheduler(JobsMixin, TemplatesMixin, DatabaseScheduler):
    pass
