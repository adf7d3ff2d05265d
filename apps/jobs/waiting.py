"""Why a job that has not started waits, in words a user acts on (`waiting_reason` of the API and the
admin): scheduled for a time, retrying after a backoff or a rate limit, behind other jobs of its
queue, held back by its owner's concurrency limit, or no worker consumes its queue at all."""

from django.db.models import Q

from apps.jobs import fairness, workers
from apps.jobs.models import Job, JobEvent, Priority, Status
from apps.jobs.statuses import Event

COUNT_UP_TO = 10_000  # "behind 10,000+ jobs": the count stops there (a bounded index range)
ORDER = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]


def reason(job: Job) -> str | None:
    if job.status == Status.SCHEDULED:
        return f"scheduled for {job.run_at:%Y-%m-%d %H:%M:%S %Z}"
    if job.held_at and job.status in (Status.QUEUED, Status.RETRYING):
        return fairness.reason(job)
    if job.status == Status.RETRYING:
        last = JobEvent.objects.filter(job=job).order_by("-at").values_list("type", "message").first()
        if last and last[0] == Event.DEFERRED:
            if job.kind == "message" and isinstance(job.payload, dict) and job.payload.get("channel"):
                return f"rate limit of channel {job.payload['channel']}: {last[1]}"
            return f"put off: {last[1]}"
        return f"retrying at {job.run_at:%H:%M:%S %Z}" if job.run_at else "retrying"
    if job.status != Status.QUEUED:
        return None
    try:
        consumers = [w for w in workers.alive().values() if job.queue in (w.get("queues") or [])]
    except Exception:  # Redis away: say what the table says
        consumers = None
    if consumers == []:
        return f"no worker consumes queue {job.queue}"
    ahead = _ahead(job)
    shown = f"{COUNT_UP_TO:,}+" if ahead >= COUNT_UP_TO else f"{ahead:,}"
    return f"behind {shown} job(s) in queue {job.queue}" if ahead else f"next in queue {job.queue}"


def _ahead(job: Job) -> int:
    """Queued jobs of its queue that a worker takes first: a higher priority, or the same one earlier
    (the job_active index), counted up to COUNT_UP_TO."""
    higher = ORDER[: ORDER.index(job.priority)] if job.priority in ORDER else []
    before = Q(priority__in=higher) | Q(priority=job.priority, queued_at__lt=job.queued_at)
    found = Job.objects.filter(before, status=Status.QUEUED, queue=job.queue, held_at__isnull=True)
    found = found.values("pk")[:COUNT_UP_TO]
    return Job.objects.filter(pk__in=found).count() if job.queued_at else 0
