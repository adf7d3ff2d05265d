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


class Event(models.TextChoices):
    """A job's timeline entries (`JobEvent.type`): a status reached, or how it was reached."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    RETRYING = "retrying"  # a passing failure; another attempt after a backoff
    REQUEUED = "requeued"  # its process died or its lease ran out; the attempt counted
    HANDED_BACK = "handed_back"  # its worker went away on purpose; the attempt did not count
    RETRIED = "retried"  # a user's replay of a finished job
    DEFERRED = "deferred"  # a 429 or a shared rate limit said "not now"; the attempt did not count
    DELIVERY = "delivery"  # a message part's delivery status reported by its provider (after the fact)
    CALLBACK = "callback"  # an attempt to POST the final job to its callback URL (the status unchanged)


class LiveEvent:
    """What live subscribers receive (`apps.jobs.live`), and the names of the SSE events."""

    STATUS = "status"
    PROGRESS = "progress"
    LOG = "log"
    TEXT = "text"
    END = "end"  # SSE only: the job is final, the stream closes
    RESYNC = "resync"  # never sent to clients: a stream reads the job row again


class ErrorType:
    """`Job.error["type"]` for endings the platform decides (a handler's own are its exception's name)."""

    TIMED_OUT = "TimeoutError"
    WORKER_LOST = "WorkerLost"
    UNSTORABLE_RESULT = "UnstorableResult"
