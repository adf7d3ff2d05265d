"""A job's statuses and priorities, defined once (see the state machine on `Job`)."""

from django.db import models


class Status(models.TextChoices):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class Priority(models.TextChoices):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


FINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)
ACTIVE_STATUSES = (Status.SCHEDULED, Status.QUEUED, Status.RUNNING, Status.RETRYING)
