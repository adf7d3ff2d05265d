import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from apps.jobs.querysets import JobQuerySet
from apps.jobs.statuses import ACTIVE_STATUSES, FINAL_STATUSES, Priority, Status

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "Artifact",
    "Job",
    "JobEvent",
    "JobTemplate",
    "LogChunk",
    "Priority",
    "Status",
    "Upload",
]


class Job(models.Model):
    """A unit of work; this row, not the broker, is the truth about it.

    State machine (only `apps.jobs.lifecycle` moves a job along it)::

        scheduled --> queued --> running --> succeeded
                        ^  |        |  \\--> failed     (dead-lettered)
                        |  |        |   \\-> timed_out  (dead-lettered)
                        |  |        v
                        |  |     retrying --> running   (next attempt, after a backoff)
                        |  v
          any non-final --> cancelled
          failed / timed_out / cancelled --(retry, replay)--> queued
          running --(worker lost, attempts left)--> queued

    `attempts` counts claims, so a job that keeps killing its worker ends dead-lettered.
    """

    Status = Status
    Priority = Priority

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Foreign keys carry no index of their own where a composite index below starts with them: every
    # status change rewrites each index entry of the row, so each index costs on the hot path.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs", db_index=False)
    kind = models.CharField(max_length=32)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    payload = models.JSONField(default=dict)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    progress_message = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3)
    timeout_seconds = models.PositiveIntegerField(default=300)
    run_at = models.DateTimeField(null=True, blank=True)
    # NULL, not "", for "no key": the unique (owner, key) constraint must ignore keyless jobs.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    callback_url = models.URLField(max_length=500, blank=True)
    # What makes two requests "the same" for kinds that deduplicate (ai_generate); "" otherwise.
    dedupe_key = models.CharField(max_length=64, blank=True, default="", editable=False)
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="children",
        db_index=False,  # the partial index job_parent below serves it
    )
    dead_lettered = models.BooleanField(default=False)
    created_at = models.DateTimeField()
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(
        max_length=200, blank=True, help_text="the Celery worker (its node name) of the latest attempt"
    )

    # The queue its kind is served on (see the kind catalogue), kept on the row for the reconciler's
    # and the stats' reads by queue.
    queue = models.CharField(max_length=16, default="default")

    # Bookkeeping of the current attempt, not part of the API. `worker` (above) is the Celery worker's
    # name; `process` the operating-system process in it that runs the attempt; `lease` the attempt's
    # fence: every write of the attempt names it, so a process that lost the job writes nothing.
    task_id = models.CharField(max_length=64, blank=True)
    process = models.CharField(
        max_length=200, blank=True, help_text="host:pid@boot:pid-namespace of the process running the attempt"
    )
    lease = models.UUIDField(null=True, blank=True, editable=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="the database's clock")
    redispatched_at = models.DateTimeField(null=True, blank=True)
    # Attempts handed back by a worker shutting down (a deploy), which did not count as attempts.
    handbacks = models.PositiveSmallIntegerField(default=0)
    # Attempts put off because a provider or a shared rate limit said "not now" (a 429), which did not
    # count as attempts either (at most JOBS_MAX_DEFERRALS, then they count).
    deferrals = models.PositiveIntegerField(default=0)
    # Set while a queued (or due retrying) job is held back from the broker because its owner has
    # JOBS_USER_CONCURRENCY jobs of its queue running or on their way (apps/jobs/fairness.py).
    held_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("submit_critical", "Can submit high and critical priority jobs (JOBS_RESTRICT_PRIORITY)")]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="job_owner_created"),
            models.Index(
                fields=["owner", "status", "-created_at"],
                name="job_owner_status_created",
            ),
            models.Index(fields=["status", "-created_at"], name="job_status_created"),
            models.Index(fields=["-created_at"], name="job_created"),  # staff's list: every owner
            models.Index(fields=["parent"], name="job_parent", condition=Q(parent__isnull=False)),
            # The reconciler only looks at unfinished jobs; this index stays small however many
            # finished jobs pile up. Queued jobs are read by queue and priority in publish order.
            models.Index(
                fields=["status", "queue", "priority", "queued_at"],
                name="job_active",
                condition=Q(
                    status__in=[
                        Status.SCHEDULED,
                        Status.QUEUED,
                        Status.RUNNING,
                        Status.RETRYING,
                    ]
                ),
            ),
            models.Index(fields=["run_at"], name="job_scheduled", condition=Q(status=Status.SCHEDULED)),
            # What finished lately, for the statistics' roll-up (apps/jobs/stats.py).
            models.Index(fields=["finished_at"], name="job_finished", condition=Q(finished_at__isnull=False)),
            models.Index(
                fields=["owner", "dedupe_key", "-created_at"],
                name="job_dedupe",
                condition=~Q(dedupe_key=""),
            ),
            models.Index(
                fields=["dead_lettered"],
                name="job_dead_lettered",
                condition=Q(dead_lettered=True),
            ),
            # Fair share (apps/jobs/fairness.py): an owner's jobs on their way to a worker of a queue,
            # and the ones held back, in the order they are let go.
            models.Index(
                fields=["owner", "queue"],
                name="job_owner_queued",
                condition=Q(status=Status.QUEUED, held_at__isnull=True),
            ),
            models.Index(
                fields=["owner", "queue", "priority", "held_at"],
                name="job_held",
                condition=Q(status__in=[Status.QUEUED, Status.RETRYING], held_at__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="job_unique_idempotency_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class JobEvent(models.Model):
    """One entry of a job's timeline: a transition, or a notable moment within one."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events", db_index=False)
    at = models.DateTimeField()
    type = models.CharField(max_length=32)
    status = models.CharField(max_length=10, choices=Job.Status.choices)
    message = models.TextField(blank=True)
    data = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["job", "at"], name="jobevent_job_at")]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.type}"


class LogChunk(models.Model):
    """A piece of a job's output log. `offset` is where it starts, in bytes of UTF-8, within the log."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks", db_index=False)
    offset = models.BigIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["offset"]
        constraints = [models.UniqueConstraint(fields=["job", "offset"], name="logchunk_job_offset")]

    def __str__(self) -> str:
        return f"{self.job_id} @{self.offset}"


def upload_path(upload: "Upload", filename: str) -> str:
    return f"uploads/{upload.owner_id}/{upload.id}.{upload.format}"


class Upload(models.Model):
    """A source archive (tar.gz or zip) a user uploaded, checked when it arrived; jobs refer to it by id."""

    class Format(models.TextChoices):
        TAR_GZ = "tar.gz"
        ZIP = "zip"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    file = models.FileField(upload_to=upload_path, max_length=300)
    name = models.CharField(max_length=255, blank=True)
    format = models.CharField(max_length=8, choices=Format.choices)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    files = models.IntegerField()
    unpacked_size = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name or self.id} ({self.size} bytes)"


def artifact_path(artifact: "Artifact", filename: str) -> str:
    return f"artifacts/{artifact.job_id}/{artifact.sha256}/{filename}"


class Artifact(models.Model):
    """A file a build produced, kept after its work directory is gone. `name` is its path in the tree."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="artifacts", db_index=False)
    name = models.CharField(max_length=500)
    file = models.FileField(upload_to=artifact_path, max_length=700)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["job", "name"], name="artifact_job_name")]

    def __str__(self) -> str:
        return self.name


class StatsCursor(models.Model):
    """How far the statistics' roll-up has read the finished jobs (one row)."""

    finished_up_to = models.DateTimeField()

    def __str__(self) -> str:
        return f"statistics up to {self.finished_up_to}"


class JobMinute(models.Model):
    """Jobs that finished in one minute, by kind and final status (kept JOBS_STATS_MINUTES_DAYS)."""

    minute = models.DateTimeField()
    kind = models.CharField(max_length=32)
    status = models.CharField(max_length=10)
    jobs = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["minute", "kind", "status"], name="jobminute_key")]

    def __str__(self) -> str:
        return f"{self.minute:%H:%M} {self.kind} {self.status}: {self.jobs}"


class JobTiming(models.Model):
    """A histogram of finished jobs' queue wait and run time, per hour and kind: `jobs` fell in
    `bucket` (bucket b holds durations up to 2**(b/4) ms); the all-time totals are at `hour` 1970-01-01."""

    hour = models.DateTimeField()
    kind = models.CharField(max_length=32)
    metric = models.CharField(max_length=4)  # "wait" (queued to started) or "run" (started to finished)
    bucket = models.SmallIntegerField()
    jobs = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["hour", "kind", "metric", "bucket"], name="jobtiming_key")]

    def __str__(self) -> str:
        return f"{self.hour} {self.kind} {self.metric}[{self.bucket}]: {self.jobs}"


class JobTotal(models.Model):
    """All-time counts of finished jobs by kind and status, with their attempts (for /metrics)."""

    kind = models.CharField(max_length=32)
    status = models.CharField(max_length=10)
    jobs = models.PositiveBigIntegerField(default=0)
    attempts = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "status"], name="jobtotal_key")]

    def __str__(self) -> str:
        return f"{self.kind} {self.status}: {self.jobs}"


class JobTemplate(models.Model):
    """A job submitted on a schedule (periodic jobs): what to submit, for whom, and when. Saving it
    keeps its django-celery-beat `PeriodicTask` in step (`apps.jobs.periodic`), which beat runs.

    One job per period: its idempotency key names the template and the period, so a second beat, or a
    beat restarted within the period, finds the period's job and submits nothing."""

    name = models.CharField(max_length=150, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="job_templates")
    kind = models.CharField(max_length=32)
    payload = models.JSONField(default=dict, blank=True)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    max_attempts = models.PositiveIntegerField(null=True, blank=True, help_text="The kind's default if empty.")
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True, help_text="The kind's default if empty.")
    callback_url = models.URLField(max_length=2000, blank=True)
    crontab = models.ForeignKey(
        "django_celery_beat.CrontabSchedule",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="Cron fields with a time zone; set this or an interval.",
    )
    interval = models.ForeignKey(
        "django_celery_beat.IntervalSchedule",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="Every N seconds/minutes/...: periods start at `start_time` (else the Unix epoch).",
    )
    start_time = models.DateTimeField(null=True, blank=True, help_text="No job before this time.")
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", on_delete=models.SET_NULL, null=True, blank=True, editable=False
    )
    last_period = models.DateTimeField(null=True, blank=True, editable=False)
    last_job = models.UUIDField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from apps.jobs import periodic

        periodic.clean(self)
