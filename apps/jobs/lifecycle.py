"""The only code that changes a job's status.

Every transition is a conditional UPDATE on the row's current status (and, for a running job, on
the process that runs it), so two actors racing on one job cannot both win; the winner writes the
transition into the job's timeline in the same transaction. Functions return whether they won.
"""

import math
from collections.abc import Iterable
from datetime import timedelta
from functools import cache
from typing import Any
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import F, Field
from django.utils import timezone

from apps.jobs import live
from apps.jobs.dispatch import publish_callback_on_commit
from apps.jobs.models import ACTIVE_STATUSES, Job, JobEvent, Status
from apps.jobs.rows import copy_insert, from_row, insert_parts, returning

RETRYABLE_FINAL = (Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)
CLEARED_ATTEMPT = {"runner": "", "heartbeat_at": None}


def add_event(job_id: UUID, type: str, status: str, message: str = "", data: dict | None = None) -> JobEvent:
    return JobEvent.objects.create(
        job_id=job_id,
        at=timezone.now(),
        type=type,
        status=status,
        message=message,
        data=data,
    )


JOB_TABLE = Job._meta.db_table


def _update_sql(
    job_id: UUID,
    from_statuses: Iterable[str],
    fields: dict[str, Any],
    where: dict[str, Any],
    *,
    extra_set: str = "",
    extra_where: tuple[str, list] | None = None,
) -> tuple[str, list]:
    """`UPDATE job SET <fields> WHERE id = job_id AND status IN from_statuses AND <where equalities>`.

    Written out rather than compiled by the ORM for each call: compiling cost more CPU than the
    statement itself on the hot path. The text is built once per shape of call; values are prepared
    by their model fields, as the ORM would.
    """
    sql, set_fields, where_fields = _update_template(
        tuple(fields), tuple(where), tuple(map(str, from_statuses)), extra_set, extra_where[0] if extra_where else ""
    )
    db = connections[DEFAULT_DB_ALIAS]  # the wrapper itself: `connection` is a proxy, per attribute
    params = [field.get_db_prep_save(value, db) for field, value in zip(set_fields, fields.values(), strict=True)]
    params.append(job_id)
    params += [field.get_db_prep_value(value, db) for field, value in zip(where_fields, where.values(), strict=True)]
    if extra_where:
        params += extra_where[1]
    return sql, params


@cache
def _update_template(
    set_names: tuple[str, ...],
    where_names: tuple[str, ...],
    from_statuses: tuple[str, ...],
    extra_set: str,
    extra_where: str,
) -> tuple[str, tuple[Field, ...], tuple[Field, ...]]:
    """The text of `_update_sql`'s statement, and the fields whose values fill its placeholders."""
    set_fields = tuple(Job._meta.get_field(name) for name in set_names)
    where_fields = tuple(Job._meta.get_field(name) for name in where_names)
    if not set(from_statuses) <= set(Status.values):
        raise ValueError(f"unknown status in {from_statuses}")
    statuses = ", ".join(f"'{status}'" for status in from_statuses)  # known constants, written inline
    sets = [extra_set] if extra_set else []
    sets += [f'"{field.column}" = %s' for field in set_fields]
    conditions = ['"id" = %s', f'"status" IN ({statuses})', *(f'"{field.column}" = %s' for field in where_fields)]
    if extra_where:
        conditions.append(extra_where)
    sql = f'UPDATE "{JOB_TABLE}" SET {", ".join(sets)} WHERE {" AND ".join(conditions)}'  # noqa: S608
    return sql, set_fields, where_fields


# On PostgreSQL a transition is one statement: `WITH moved AS (UPDATE ... RETURNING ...)` followed by
# this INSERT of the timeline entry, selected from `moved` (so it exists only if the update won).
INSERT_EVENT = f"INSERT INTO {JobEvent._meta.db_table} (job_id, at, type, status, message, data) "


def _announce(job_id: UUID, status: str, message: str = "") -> None:
    """Tell live subscribers (SSE streams) once the transition is committed."""
    transaction.on_commit(lambda: live.publish(job_id, {"type": "status", "status": status, "message": message}))


def _transition(
    job_id: UUID,
    from_statuses: Iterable[str],
    to: str,
    *,
    event: str,
    message: str = "",
    data: dict | None = None,
    only_if: dict | None = None,
    **fields: Any,
) -> bool:
    from_statuses = list(from_statuses)
    if connection.vendor == "postgresql":
        # One statement (update and timeline entry) instead of four round trips: this is the hot path.
        update, update_params = _update_sql(job_id, from_statuses, {"status": to, **fields}, only_if or {})
        at = JobEvent._meta.get_field("at").get_db_prep_value(timezone.now(), connection)
        data_param = JobEvent._meta.get_field("data").get_db_prep_value(data, connection)
        sql = (
            f"WITH moved AS ({update} RETURNING id) {INSERT_EVENT}"  # noqa: S608 (built from model metadata)
            "SELECT id, %s, %s, %s, %s, %s FROM moved"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*update_params, at, event, to, message, data_param])
            won = cursor.rowcount == 1
    else:
        queryset = Job.objects.filter(pk=job_id, status__in=from_statuses, **(only_if or {}))
        with transaction.atomic():
            won = queryset.update(status=to, **fields) == 1
            if won:
                add_event(job_id, event, to, message, data)
    if won:
        _announce(job_id, to, message)
    return won


def create_jobs(jobs: list[Job]) -> list[Job]:
    """Insert new jobs (queued, or scheduled when `run_at` is in the future) with their first event.

    On PostgreSQL one job is one statement (its event inserted from the job's RETURNING), atomic by
    itself, so outside a transaction it costs one round trip instead of BEGIN, two INSERTs and
    COMMIT; a batch is two COPYs.
    """
    if not jobs:
        return jobs
    now = timezone.now()
    for job in jobs:
        job.created_at = job.created_at or now
        if job.run_at and job.run_at > now:
            job.status = Status.SCHEDULED
        else:
            job.status, job.queued_at = Status.QUEUED, now
    if connection.vendor == "postgresql" and len(jobs) == 1:
        # The timeline entry is selected from the job's RETURNING, as in the transitions.
        insert_job, job_values, job_params = insert_parts(Job, jobs[0])
        at = JobEvent._meta.get_field("at").get_db_prep_value(now, connection)
        sql = (
            f"WITH job AS ({insert_job} VALUES ({job_values}) RETURNING id) "  # noqa: S608 (model metadata)
            f"{INSERT_EVENT}SELECT id, %s, %s, %s, '', NULL FROM job"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*job_params, at, jobs[0].status, jobs[0].status])
        jobs[0]._state.adding, jobs[0]._state.db = False, connection.alias
        return jobs
    events = [JobEvent(job_id=job.id, at=now, type=job.status, status=job.status) for job in jobs]
    if connection.vendor == "postgresql":
        with transaction.atomic(savepoint=False):
            copy_insert(Job, jobs)
            copy_insert(JobEvent, events)
    else:
        with transaction.atomic():
            Job.objects.bulk_create(jobs)
            JobEvent.objects.bulk_create(events)
    return jobs


def claim(job_id: UUID, *, task_id: str, worker: str, runner: str) -> Job | None:
    """Take a queued (or due retrying) job for this process; None if another claim won or it is not due."""
    now = timezone.now()
    fields = {
        "status": Status.RUNNING,
        "started_at": now,
        "finished_at": None,
        "heartbeat_at": now,
        "worker": worker,
        "runner": runner,
        "task_id": task_id,
        "progress": 0,
        "progress_message": "",
    }
    if connection.vendor == "postgresql":
        # One statement: the claim, and its timeline entry naming the new attempt number.
        update, update_params = _update_sql(
            job_id,
            [Status.QUEUED, Status.RETRYING],
            fields,
            {},
            extra_set='"attempts" = "attempts" + 1',
            extra_where=('("run_at" IS NULL OR "run_at" <= %s)', [now]),  # only when due
        )
        at = JobEvent._meta.get_field("at").get_db_prep_value(now, connection)
        sql = (
            f"WITH moved AS ({update} RETURNING *), event AS ({INSERT_EVENT}"  # noqa: S608 (built from model metadata)
            "SELECT id, %s, %s, %s, 'attempt ' || attempts || ' on ' || worker, "
            f"jsonb_build_object('attempt', attempts) FROM moved) SELECT {returning(Job)} FROM moved"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*update_params, at, "running", Status.RUNNING])
            row = cursor.fetchone()
        job = row and from_row(Job, row)
    else:
        queryset = Job.objects.filter(pk=job_id, status__in=[Status.QUEUED, Status.RETRYING]).exclude(run_at__gt=now)
        with transaction.atomic():
            if queryset.update(attempts=F("attempts") + 1, **fields) != 1:
                return None
            job = Job.objects.get(pk=job_id)
            add_event(
                job_id, "running", Status.RUNNING, f"attempt {job.attempts} on {worker}", {"attempt": job.attempts}
            )
    if job is not None:
        _announce(job_id, Status.RUNNING, f"attempt {job.attempts} on {worker}")
    return job


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


def succeed(job: Job, result: Any, progress_message: str | None = None) -> bool:
    result = storable(result)
    extra = {} if progress_message is None else {"progress_message": storable(progress_message[:200])}
    won = _transition(
        job.pk,
        [Status.RUNNING],
        Status.SUCCEEDED,
        event="succeeded",
        only_if={"runner": job.runner},
        result=result,
        error=None,
        progress=100,
        finished_at=timezone.now(),
        **CLEARED_ATTEMPT,
        **extra,
    )
    if won:
        publish_callback_on_commit(job)
    return won


def fail(job: Job, error_type: str, message: str, *, status: str = Status.FAILED) -> bool:
    """End a running job as failed or timed out; it goes to the dead-letter queue for replay."""
    message = storable(message)
    won = _transition(
        job.pk,
        [Status.RUNNING],
        status,
        event=status,
        message=message,
        data={"dead_lettered": True, "attempt": job.attempts},
        only_if={"runner": job.runner},
        error={"type": error_type, "message": message},
        dead_lettered=True,
        finished_at=timezone.now(),
        **CLEARED_ATTEMPT,
    )
    if won:
        publish_callback_on_commit(job)
    return won


def schedule_retry(job: Job, error_type: str, message: str, delay: float) -> bool:
    message = storable(message)
    return _transition(
        job.pk,
        [Status.RUNNING],
        Status.RETRYING,
        event="retrying",
        message=f"{message} (attempt {job.attempts} of {job.max_attempts}; next in {delay:.1f}s)",
        data={"attempt": job.attempts, "delay_s": round(delay, 3)},
        only_if={"runner": job.runner},
        error={"type": error_type, "message": message},
        run_at=timezone.now() + timedelta(seconds=delay),
        **CLEARED_ATTEMPT,
    )


def requeue_interrupted(job: Job, reason: str) -> bool:
    """Put back a running job whose attempt was cut short by something other than the job itself."""
    return _transition(
        job.pk,
        [Status.RUNNING],
        Status.QUEUED,
        event="requeued",
        message=reason,
        only_if={"runner": job.runner},
        queued_at=timezone.now(),
        redispatched_at=None,
        **CLEARED_ATTEMPT,
    )


def cancel(job_id: UUID) -> tuple[bool, Job]:
    """Cancel an unfinished job. Returns (won, job as it was before)."""
    job = Job.objects.get(pk=job_id)
    won = _transition(
        job_id,
        ACTIVE_STATUSES,
        Status.CANCELLED,
        event="cancelled",
        finished_at=timezone.now(),
        **CLEARED_ATTEMPT,
    )
    if won:
        publish_callback_on_commit(job)
    return won, job


def retry(job_id: UUID) -> bool:
    """Run a failed, timed-out or cancelled job again from its first attempt (replays a dead letter)."""
    return _transition(
        job_id,
        RETRYABLE_FINAL,
        Status.QUEUED,
        event="retried",
        message="re-queued by request",
        attempts=0,
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
        **CLEARED_ATTEMPT,
    )


def promote(job_id: UUID) -> bool:
    """A scheduled job whose time has come joins its queue."""
    return _transition(
        job_id,
        [Status.SCHEDULED],
        Status.QUEUED,
        event="queued",
        message="scheduled time reached",
        queued_at=timezone.now(),
    )


def recover_lost(job: Job, reason: str) -> str | None:
    """Settle a running job whose process is gone: time it out, dead-letter it, or queue it again.

    Returns the status it moved to, or None if the job had moved on meanwhile.
    """
    now = timezone.now()
    if job.started_at and job.started_at + timedelta(seconds=job.timeout_seconds) <= now:
        status, message = (
            Status.TIMED_OUT,
            f"timed out after {job.timeout_seconds}s ({reason})",
        )
    elif job.attempts >= job.max_attempts:
        status, message = (
            Status.FAILED,
            f"{reason} on attempt {job.attempts} of {job.max_attempts}",
        )
    else:
        won = requeue_interrupted(job, reason)
        return Status.QUEUED if won else None
    error_type = "TimeoutError" if status == Status.TIMED_OUT else "WorkerLost"
    return status if fail(job, error_type, message, status=status) else None


def heartbeat(job: Job) -> bool:
    """Renew the lease of a running job; False once the job is no longer this process's (e.g. cancelled)."""
    return (
        Job.objects.filter(pk=job.pk, status=Status.RUNNING, runner=job.runner).update(heartbeat_at=timezone.now()) == 1
    )


def set_progress(job: Job, percent: int, message: str) -> None:
    if Job.objects.filter(pk=job.pk, status=Status.RUNNING, runner=job.runner).update(
        progress=percent, progress_message=message[:200]
    ):
        live.publish(job.pk, {"type": "progress", "progress": percent, "message": message[:200]})


def mark_redispatched(job_ids: list[UUID]) -> None:
    Job.objects.filter(pk__in=job_ids).update(redispatched_at=timezone.now())
