"""The only code that changes a job's status, and the owner of what follows each change.

Every transition is a conditional UPDATE on the row's current status (and, for a running job, on the
lease of the attempt that runs it: a process that lost its job writes nothing), so two actors racing
on one job cannot both win; the winner writes the transition into the job's timeline in the same
statement. What a transition sets off once committed (publishing the job again, its callback, the
live status event) is done here, never by the caller. Functions return whether they won (or the
status they moved the job to).

How an attempt ends is decided in one place, `end_attempt`: past the job's deadline it is
`timed_out`; a passing failure with attempts left is `retrying` after a backoff; anything else is
`failed` and dead-lettered. A worker that goes away on purpose hands its running jobs back
(`hand_back`) without counting the attempt, a bounded number of times; a lost worker's attempt counts
(`recover_lost`).
"""

import copy
import math
import random
import uuid
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.jobs import fairness, live, sql
from apps.jobs.dispatch import publish_callback_on_commit, publish_on_commit, publish_safely
from apps.jobs.kinds import get_kind
from apps.jobs.models import ACTIVE_STATUSES, Job, JobEvent, Status
from apps.jobs.signals import has_followers, job_finished
from apps.jobs.statuses import ErrorType, Event, LiveEvent

RETRYABLE_FINAL = (Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)
CLEARED_ATTEMPT = {"process": "", "lease": None, "heartbeat_at": None}


def storable(value: Any) -> Any:
    """`value` as PostgreSQL's jsonb and text can hold it: NUL and lone surrogates become U+FFFD, and
    non-finite floats (NaN, infinities, which JSON has no words for) become None. A job's result and
    messages come from tools and models, so anything may be in them."""
    if isinstance(value, str):
        value = value.replace("\0", "\ufffd")
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates
            value = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when it gave one, within
    JOBS_RETRY_MAX_SECONDS (a server cannot park a job for a day)."""
    if retry_after is not None:
        return min(max(0.0, retry_after), settings.JOBS_RETRY_MAX_SECONDS)
    ceiling = min(settings.JOBS_RETRY_MAX_SECONDS, settings.JOBS_RETRY_BASE_SECONDS * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


def _announce(job_id: UUID, status: str, message: str = "") -> None:
    """Tell live subscribers (SSE streams) once the transition is committed."""
    transaction.on_commit(
        lambda: live.publish(job_id, {"type": LiveEvent.STATUS, "status": status, "message": message})
    )


def _transition(
    job: Job,
    from_statuses: Iterable[str],
    to: str,
    *,
    event: str,
    message: str = "",
    data: dict | None = None,
    fenced: bool = False,
    extra_set: str = "",
    **fields: Any,
) -> bool:
    """Move `job`; a `fenced` move applies only while the job runs under the attempt's lease. The
    in-memory job takes the new values when it wins."""
    only_if = {"lease": job.lease} if fenced else {}
    won = sql.transition(
        job.pk,
        list(from_statuses),
        to,
        event=event,
        message=message,
        data=data,
        fields=fields,
        only_if=only_if,
        extra_set=extra_set,
    )
    if won:
        job.status = to
        for name, value in fields.items():
            setattr(job, name, value)
        _announce(job.pk, to, message)
        if Status.RUNNING in from_statuses and to != Status.RUNNING:
            fairness.release_after(job)  # a slot of its owner's is free: the next held job goes
    return won


def create_jobs(jobs: list[Job]) -> list[Job]:
    """Insert new jobs (queued, or scheduled when `run_at` is in the future) with their first event,
    and publish the queued ones once committed."""
    if not jobs:
        return jobs
    now = timezone.now()
    for job in jobs:
        job.created_at = job.created_at or now
        job.queue = get_kind(job.kind).queue
        if job.run_at and job.run_at > now:
            job.status = Status.SCHEDULED
        else:
            job.status, job.queued_at = Status.QUEUED, now
    queued = [job for job in jobs if job.status == Status.QUEUED]
    admitted = fairness.admit(queued)  # the rest held: see fairness
    sql.insert_jobs(jobs, [JobEvent(job_id=job.id, at=now, type=job.status, status=job.status) for job in jobs])
    publish_on_commit(admitted)
    return jobs


def claim(job_id: UUID | str, *, task_id: str, worker: str, process: str) -> Job | None:
    """Take a queued (or due retrying) job for this process under a new lease; None if another claim
    won or it is not due."""
    fields = {
        "status": Status.RUNNING,
        "finished_at": None,
        "worker": worker,
        "process": process,
        "lease": uuid.uuid4(),
        "task_id": task_id,
        "progress": 0,
        "progress_message": "",
        "held_at": None,  # a held job's stray message (a duplicate, a retry's) runs it: it is not held
    }
    if fairness.enabled():  # at most JOBS_USER_CONCURRENCY of its owner's jobs run at once
        job = fairness.claim_within_cap(job_id, lambda: sql.claim(job_id, fields, event=Event.RUNNING))
    else:
        job = sql.claim(job_id, fields, event=Event.RUNNING)
    if job is not None:
        _announce(job.pk, Status.RUNNING, f"attempt {job.attempts} on {worker}")
    return job


def _finishing(job: Job) -> Any:
    """The transaction a final transition runs in: its own statement, or (for a job that other work
    follows, see `apps.jobs.signals`) one that the followers' writes join."""
    return transaction.atomic() if has_followers(job) else nullcontext()


def _finished(job: Job) -> None:
    publish_callback_on_commit(job)
    if has_followers(job):
        job_finished.send(Job, job=job)


def succeed(job: Job, result: Any, progress_message: str | None = None) -> bool:
    extra = {} if progress_message is None else {"progress_message": storable(progress_message[:200])}
    with _finishing(job):
        won = _transition(
            job,
            [Status.RUNNING],
            Status.SUCCEEDED,
            event=Event.SUCCEEDED,
            fenced=True,
            result=storable(result),
            error=None,
            progress=100,
            finished_at=timezone.now(),
            **CLEARED_ATTEMPT,
            **extra,
        )
        if won:
            _finished(job)
    return won


def _fail(job: Job, error_type: str, message: str, status: str, *, fenced: bool = True) -> bool:
    """End a running job as failed or timed out; it goes to the dead-letter queue for replay."""
    message = storable(message)
    with _finishing(job):
        won = _transition(
            job,
            [Status.RUNNING],
            status,
            event=status,
            message=message,
            data={"dead_lettered": True, "attempt": job.attempts},
            fenced=fenced,
            error={"type": error_type, "message": message},
            dead_lettered=True,
            finished_at=timezone.now(),
            **CLEARED_ATTEMPT,
        )
        if won:
            _finished(job)
    return won


def end_attempt(
    job: Job,
    error_type: str,
    message: str,
    *,
    retryable: bool,
    retry_after: float | None = None,
    timed_out: bool = False,
    counted: bool = True,
) -> str | None:
    """What follows an attempt that did not succeed, decided here and nowhere else. Returns the status
    the job moved to, or None if the attempt was no longer the job's (cancelled, taken over).

    An attempt that is not `counted` (a provider's 429, a shared rate limit: the job was told "not
    now", it did not fail) is tried again after `retry_after` without using up an attempt, at most
    JOBS_MAX_DEFERRALS times."""
    if timed_out:
        won = _fail(job, ErrorType.TIMED_OUT, f"timed out after {job.timeout_seconds}s", Status.TIMED_OUT)
        return Status.TIMED_OUT if won else None
    message = storable(message)
    if retryable and not counted and job.deferrals < settings.JOBS_MAX_DEFERRALS:
        delay = backoff(job.attempts, retry_after if retry_after is not None else 1.0)
        won = _transition(
            job,
            [Status.RUNNING],
            Status.RETRYING,
            event=Event.DEFERRED,
            message=f"{message} (next try in {delay:.1f}s; not counted as an attempt)",
            data={"attempt": job.attempts, "delay_s": round(delay, 3), "deferrals": job.deferrals + 1},
            fenced=True,
            extra_set='"attempts" = "attempts" - 1, "deferrals" = "deferrals" + 1',
            run_at=timezone.now() + timedelta(seconds=delay),
            **CLEARED_ATTEMPT,
        )
        if won:
            job.attempts, job.deferrals = job.attempts - 1, job.deferrals + 1
            transaction.on_commit(lambda: publish_safely([job], countdown=delay))
        return Status.RETRYING if won else None
    if retryable and job.attempts < job.max_attempts:
        delay = backoff(job.attempts, retry_after)
        won = _transition(
            job,
            [Status.RUNNING],
            Status.RETRYING,
            event=Event.RETRYING,
            message=f"{message} (attempt {job.attempts} of {job.max_attempts}; next in {delay:.1f}s)",
            data={"attempt": job.attempts, "delay_s": round(delay, 3)},
            fenced=True,
            error={"type": error_type, "message": message},
            run_at=timezone.now() + timedelta(seconds=delay),
            **CLEARED_ATTEMPT,
        )
        if won:
            transaction.on_commit(lambda: publish_safely([job], countdown=delay))
        return Status.RETRYING if won else None
    if retryable:
        message = f"{message} (gave up after {job.attempts} attempts)"
    return Status.FAILED if _fail(job, error_type, message, Status.FAILED) else None


def _requeue(job: Job, event: str, reason: str, *, counted: bool, publish: bool = True) -> bool:
    """Put a running job back in its queue (published once committed, unless the caller claims it at
    once). An attempt that does not count is taken off `attempts` and counted in `handbacks` instead."""
    fields: dict[str, Any] = {"queued_at": timezone.now(), "redispatched_at": None, **CLEARED_ATTEMPT}
    extra_set = "" if counted else '"attempts" = "attempts" - 1, "handbacks" = "handbacks" + 1'
    won = _transition(job, [Status.RUNNING], Status.QUEUED, event=event, message=reason, fenced=True,
                      extra_set=extra_set, **fields)  # fmt: skip
    if won:
        if not counted:
            job.attempts, job.handbacks = job.attempts - 1, job.handbacks + 1
        if publish:
            publish_on_commit([job])
    return won


def hand_back(job: Job, reason: str) -> str | None:
    """A worker going away on purpose (a deploy) hands a running job back: queued again at once, the
    attempt not counted, at most JOBS_MAX_HANDBACKS times (after that a hand-back counts as an
    attempt, so that no job is handed around for ever)."""
    if job.handbacks < settings.JOBS_MAX_HANDBACKS:
        won = _requeue(job, Event.HANDED_BACK, f"{reason}; handed back (not counted as an attempt)", counted=False)
        return Status.QUEUED if won else None
    return recover_lost(job, f"{reason}; handed back {job.handbacks} times already")


def recover_lost(job: Job, reason: str, now: datetime | None = None, *, publish: bool = True) -> str | None:
    """Settle a running attempt whose process is gone or stopped: timed out if past its deadline (on
    the database's clock, `now`), dead-lettered if it was the last attempt, else queued again.

    Returns the status it moved to, or None if the job had moved on meanwhile.
    """
    now = now or sql.db_now()
    if job.started_at and job.started_at + timedelta(seconds=job.timeout_seconds) <= now:
        message = f"timed out after {job.timeout_seconds}s ({reason})"
        return Status.TIMED_OUT if _fail(job, ErrorType.TIMED_OUT, message, Status.TIMED_OUT) else None
    if job.attempts >= job.max_attempts:
        message = f"{reason} on attempt {job.attempts} of {job.max_attempts}"
        return Status.FAILED if _fail(job, ErrorType.WORKER_LOST, message, Status.FAILED) else None
    return Status.QUEUED if _requeue(job, Event.REQUEUED, reason, counted=True, publish=publish) else None


def cancel(job_id: UUID) -> tuple[bool, Job]:
    """Cancel an unfinished job. Returns (won, job as it was before)."""
    job = Job.objects.get(pk=job_id)
    before = copy.copy(job)
    with _finishing(job):
        won = _transition(job, ACTIVE_STATUSES, Status.CANCELLED, event=Event.CANCELLED,
                          finished_at=timezone.now(), held_at=None, **CLEARED_ATTEMPT)  # fmt: skip
        if won:
            _finished(job)
    return won, before


def replay(job_id: UUID) -> bool:
    """A user's retry: run a failed, timed-out or cancelled job again from its first attempt (this
    replays a dead letter), published once committed."""
    job = Job.objects.get(pk=job_id)
    admitted = fairness.admit([job])
    won = _transition(
        job,
        RETRYABLE_FINAL,
        Status.QUEUED,
        event=Event.RETRIED,
        message="re-queued by request",
        attempts=0,
        handbacks=0,
        deferrals=0,
        dead_lettered=False,
        result=None,
        error=None,
        progress=0,
        progress_message="",
        run_at=None,
        queued_at=timezone.now(),
        started_at=None,
        finished_at=None,
        redispatched_at=None,
        held_at=job.held_at,
        **CLEARED_ATTEMPT,
    )
    if won and admitted:
        publish_on_commit([job])
    return won


def promote(job: Job) -> bool:
    """A scheduled job whose time has come joins its queue (published once committed, unless held)."""
    admitted = fairness.admit([job])
    won = _transition(job, [Status.SCHEDULED], Status.QUEUED, event=Event.QUEUED, message="scheduled time reached",
                      queued_at=timezone.now(), held_at=job.held_at)  # fmt: skip
    if won and admitted:
        publish_on_commit([job])
    return won


def reschedule(job: Job, run_at: datetime, priority: str) -> bool:
    """Move a scheduled job's time (or priority) while it is still scheduled; beat promotes it when
    its new time comes (at once, for a time already past)."""
    return _transition(job, [Status.SCHEDULED], Status.SCHEDULED, event=Event.SCHEDULED,
                       message=f"rescheduled for {run_at.isoformat()} ({priority} priority)",
                       run_at=run_at, priority=priority)  # fmt: skip


def redispatch(jobs: list[Job]) -> None:
    """Publish again jobs whose message was lost (their claim decides, should the old one turn up), at
    the head of their queue: they had waited their turn already."""
    if not jobs:
        return
    now = timezone.now()
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(redispatched_at=now)
    for job in jobs:
        job.redispatched_at = now
    transaction.on_commit(lambda: publish_safely(jobs, front=True))


def heartbeats(jobs: list[Job]) -> dict[tuple[UUID, UUID], bool]:
    """Renew the leases of several running attempts at once: for each (job, lease) still held, whether
    it was renewed (a row locked elsewhere is skipped this time); an attempt missing from it was
    cancelled or taken over."""
    return sql.heartbeats([(job.pk, job.lease) for job in jobs])


def set_progress(job: Job, percent: int, message: str) -> None:
    if Job.objects.filter(pk=job.pk, status=Status.RUNNING, lease=job.lease).update(
        progress=percent, progress_message=storable(message[:200])
    ):
        live.publish(job.pk, {"type": LiveEvent.PROGRESS, "progress": percent, "message": message[:200]})
