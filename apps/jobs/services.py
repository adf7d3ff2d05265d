"""Writes: submitting, cancelling and replaying jobs, and keeping uploads. Views, the admin and the
management commands call these; what follows each change (publishing, callbacks) is the lifecycle's."""

import hashlib
import json
import logging
from contextlib import nullcontext
from datetime import timedelta
from types import SimpleNamespace
from typing import Any
from uuid import UUID

from celery import current_app
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from apps.jobs import archives, lifecycle
from apps.jobs.dispatch import CANCEL_COMMAND
from apps.jobs.kinds import get_kind
from apps.jobs.models import Job, Status, Upload

log = logging.getLogger(__name__)


class JobConflict(Exception):
    """The job is in a state where the requested action makes no sense."""


def build_job(owner: AbstractBaseUser, spec: dict[str, Any]) -> Job:
    """A new, unsaved Job from validated submission fields, with the kind's defaults filled in."""
    kind = get_kind(spec["kind"])
    return Job(
        owner=owner,
        dedupe_key=(kind.dedupe_key and kind.dedupe_key(owner.pk, spec["payload"])) or "",
        kind=kind.name,
        queue=kind.queue,
        priority=spec.get("priority") or Job.Priority.NORMAL,
        payload=spec["payload"],
        max_attempts=spec.get("max_attempts") or kind.max_attempts,
        timeout_seconds=spec.get("timeout_seconds") or kind.timeout_seconds,
        run_at=spec.get("run_at"),
        idempotency_key=spec.get("idempotency_key") or None,
        callback_url=spec.get("callback_url") or "",
        parent=spec.get("parent"),
    )


def submit_job(owner: AbstractBaseUser, spec: dict[str, Any], *, job_id: UUID | None = None) -> tuple[Job, bool]:
    """Create a job and publish it after commit. Returns (job, created): a repeated idempotency key
    returns the job first submitted with it, and creates nothing; so does a `job_id` already taken (a
    submission sent twice over the broker)."""
    key = spec.get("idempotency_key")
    if key and (existing := Job.objects.by_idempotency_key(owner, key).first()):
        return existing, False
    if job_id is not None and (existing := Job.objects.filter(pk=job_id, owner=owner).first()):
        return existing, False
    job = build_job(owner, spec)
    if job_id is not None:
        job.id = job_id
    # A transaction only where one is needed: to look for a duplicate under its lock, or to keep
    # the caller's transaction usable should the insert fail. Otherwise creating the job is one
    # statement (see create_jobs), and the job is published as soon as it returns.
    needs_transaction = bool(job.dedupe_key) or connection.in_atomic_block
    try:
        with transaction.atomic() if needs_transaction else nullcontext():
            if job.dedupe_key and (duplicate := find_duplicate(owner, job.dedupe_key)):
                return duplicate, False
            lifecycle.create_jobs([job])
    except IntegrityError:
        # Two requests raced with the same key (or two deliveries of one submission with its id).
        if key and (existing := Job.objects.by_idempotency_key(owner, key).first()):
            return existing, False
        if job_id is not None:
            if existing := Job.objects.filter(pk=job_id, owner=owner).first():
                return existing, False
            if Job.objects.filter(pk=job_id).exists():  # another user's job has this id
                raise SubmissionRefused({"id": [f"{job_id} is taken."]}) from None
        raise
    return job, True


class SubmissionRefused(ValueError):
    """A submission that is not valid: `errors` as the API would answer them (field -> reasons)."""

    def __init__(self, errors: Any) -> None:
        super().__init__(json.dumps(errors, default=str))
        self.errors = errors


def submit_as(username: str, data: dict[str, Any], *, job_id: UUID | None = None) -> tuple[Job, bool]:
    """A submission from outside the API (the Celery `conveyor.submit` task, `manage.py jobs submit`)
    for the user `username`: the API's own validation, then the same path as `POST /api/jobs/`."""
    owner = get_user_model().objects.filter(username=username, is_active=True).first()
    if owner is None:
        raise SubmissionRefused({"owner": [f"No active user {username!r}."]})
    return submit_job(owner, validated_as(owner, data), job_id=job_id)


def validated_as(owner: AbstractBaseUser, data: dict[str, Any]) -> dict[str, Any]:
    """`data` checked as `POST /api/jobs/` checks it for `owner`: the submission's fields, or
    SubmissionRefused (and the API's own exceptions for a missing permission or a spent budget)."""
    from apps.jobs.api.serializers import JobSubmitSerializer

    submitted = JobSubmitSerializer(data=data, context={"request": SimpleNamespace(user=owner)})
    if not submitted.is_valid():
        raise SubmissionRefused(submitted.errors)
    return dict(submitted.validated_data)


def find_duplicate(owner: AbstractBaseUser, dedupe_key: str) -> Job | None:
    """The owner's job for the same request that is under way, or succeeded within AI_DEDUPE_TTL.

    Call inside a transaction: it takes a lock on the key (an advisory lock) so that two identical
    requests racing make one job.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int(dedupe_key[:15], 16)])
    recent = timezone.now() - timedelta(seconds=settings.AI_DEDUPE_TTL)
    return Job.objects.same_request(owner, dedupe_key, succeeded_since=recent).first()


def submit_batch(owner: AbstractBaseUser, specs: list[dict[str, Any]]) -> list[Job]:
    """Create every job of an already validated batch in one transaction and publish them together.

    An item whose idempotency key was used before (or earlier in the batch) yields that job instead,
    and so does an item of a deduplicating kind whose request is already under way (see find_duplicate).
    """
    keys = [spec["idempotency_key"] for spec in specs if spec.get("idempotency_key")]
    known = {job.idempotency_key: job for job in Job.objects.by_idempotency_key(owner, *keys)}
    same_request: dict[str, Job] = {}
    jobs: list[Job] = []
    new: list[Job] = []
    with transaction.atomic():
        for spec in specs:
            key = spec.get("idempotency_key")
            if key and key in known:
                jobs.append(known[key])
                continue
            job = build_job(owner, spec)
            if job.dedupe_key:
                if job.dedupe_key not in same_request:
                    same_request[job.dedupe_key] = find_duplicate(owner, job.dedupe_key) or job
                if same_request[job.dedupe_key] is not job:
                    jobs.append(same_request[job.dedupe_key])
                    continue
            if key:
                known[key] = job
            jobs.append(job)
            new.append(job)
        lifecycle.create_jobs(new)
    return jobs


def cancel_job(job: Job) -> Job:
    """Cancel a job that has not finished. A running one is stopped: its process is signalled."""
    won, before = lifecycle.cancel(job.pk)
    if not won:
        raise JobConflict(f"a {before.status} job cannot be cancelled")
    if before.status == Status.RUNNING and before.task_id:
        # The running process also notices at its next heartbeat, should this broadcast be lost (or
        # the broker be down: the cancel is committed either way).
        try:
            arguments = {"job_id": str(job.pk), "task_id": before.task_id}
            current_app.control.broadcast(CANCEL_COMMAND, arguments=arguments)
        except Exception:
            log.warning("could not broadcast the cancel of job %s; its heartbeat will stop it", job.pk, exc_info=True)
    job.refresh_from_db()
    return job


def reschedule_job(job: Job, run_at: Any, priority: str) -> Job:
    """Change when a scheduled job starts (None: now) and its priority."""
    if not lifecycle.reschedule(job, run_at or timezone.now(), priority):
        job.refresh_from_db()
        raise JobConflict(f"a {job.status} job cannot be rescheduled")
    job.refresh_from_db()
    return job


def replay_job(job: Job) -> Job:
    """Queue a failed, timed-out or cancelled job again (this replays a dead-lettered job)."""
    if not lifecycle.replay(job.pk):
        job.refresh_from_db()
        raise JobConflict(f"a {job.status} job cannot be retried")
    job.refresh_from_db()
    return job


def save_upload(owner: AbstractBaseUser, file: UploadedFile) -> Upload:
    """Check a source archive (ArchiveError says why it is refused) and keep it for jobs to use."""
    info = archives.inspect(file)
    digest = hashlib.sha256()
    for block in file.chunks():
        digest.update(block)
    file.seek(0)
    upload = Upload(
        owner=owner,
        name=(file.name or "")[:255],
        format=info.format,
        size=file.size,
        sha256=digest.hexdigest(),
        files=info.files,
        unpacked_size=info.unpacked_size,
    )
    upload.file.save(f"{upload.id}.{info.format}", file, save=True)
    return upload
