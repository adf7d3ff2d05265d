"""Reads of the job table as queryset methods: the API, the services, the reconciler and its index
test use these same methods (Read the Docs' `builds/querysets.py`)."""

from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet

from apps.jobs.statuses import ACTIVE_STATUSES, Status


class JobQuerySet(QuerySet):
    def visible_to(self, user: AbstractBaseUser) -> "JobQuerySet":
        """A user's own jobs; staff see all."""
        return self if user.is_staff else self.filter(owner=user)

    def by_idempotency_key(self, owner: AbstractBaseUser, *keys: str) -> "JobQuerySet":
        """The owner's jobs submitted with any of `keys` (the `job_unique_idempotency_key` index)."""
        return self.filter(owner=owner, idempotency_key__in=keys)

    def same_request(self, owner: AbstractBaseUser, dedupe_key: str, succeeded_since: datetime) -> "JobQuerySet":
        """The owner's jobs for the same request (a deduplicating kind) under way, or that succeeded
        since `succeeded_since`; newest first."""
        return (
            self.filter(owner=owner, dedupe_key=dedupe_key)
            .filter(Q(status__in=ACTIVE_STATUSES) | Q(status=Status.SUCCEEDED, finished_at__gte=succeeded_since))
            .order_by("-created_at")
        )

    def due_scheduled(self, now: datetime) -> "JobQuerySet":
        """Scheduled jobs whose time has come (the `job_scheduled` index)."""
        return self.filter(status=Status.SCHEDULED, run_at__lte=now)

    def silent_running(self, since: datetime) -> "JobQuerySet":
        """Running jobs whose lease was not renewed since `since` (the database's clock)."""
        return self.filter(status=Status.RUNNING, heartbeat_at__lt=since)

    def stuck_retrying(self, before: datetime) -> "JobQuerySet":
        """Retrying jobs long past their retry time whose (delayed) message never came, not
        published again since `before`."""
        return self.filter(status=Status.RETRYING, run_at__lt=before, held_at__isnull=True).filter(
            Q(redispatched_at__isnull=True) | Q(redispatched_at__lt=before)
        )

    def unclaimed(self, queue: str) -> "JobQuerySet":
        """Jobs waiting in `queue` for a worker (the `job_active` index: status, queue, priority,
        queued_at), not those held back by a user concurrency limit (they are not in the broker)."""
        return self.filter(status=Status.QUEUED, queue=queue, held_at__isnull=True)

    def published_before(self, cutoff: datetime) -> "JobQuerySet":
        """Jobs whose latest message was published before `cutoff` (queued, or published again)."""
        return self.filter(queued_at__lt=cutoff).filter(Q(redispatched_at__isnull=True) | Q(redispatched_at__lt=cutoff))
