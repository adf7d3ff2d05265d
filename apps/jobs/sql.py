"""The hand-written statements of the hot path (PostgreSQL), in one place.

Each job's life is a handful of statements (insert, claim, finish), and compiling them through the
ORM cost more CPU than running them: here their text is built once per shape from model metadata,
and values are prepared by their model fields exactly as the ORM would. Every statement that moves a
job also writes its timeline entry, selected from the row the UPDATE returned, so the two are one
round trip and one atomic step. The ORM version each replaces is written beside it (`*_orm`);
`tests/test_sql.py` runs both and compares what they leave.

Times that leases depend on (`heartbeat_at`, `started_at`) come from the database's clock (`now()`),
never from a worker's, so that hosts whose clocks differ cannot misjudge each other's leases.
"""

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import F, Field
from django.db.models.functions import Now
from django.utils import timezone

from apps.jobs.models import Job, JobEvent, Status
from apps.jobs.rows import copy_insert, from_row, insert_parts, returning

JOB_TABLE = Job._meta.db_table
# `WITH moved AS (UPDATE ... RETURNING ...)` followed by this INSERT of the timeline entry, selected
# from `moved` (so the entry exists only if the update won).
INSERT_EVENT = f"INSERT INTO {JobEvent._meta.db_table} (job_id, at, type, status, message, data) "


def _db():
    return connections[DEFAULT_DB_ALIAS]


@cache
def _update_template(
    set_names: tuple[str, ...],
    where_names: tuple[str, ...],
    from_statuses: tuple[str, ...],
    extra_set: str,
    extra_where: str,
) -> tuple[str, tuple[Field, ...], tuple[Field, ...]]:
    """`UPDATE job SET <fields> WHERE id = %s AND status IN (...) AND <where equalities>`, and the
    fields whose values fill its placeholders."""
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


def update_sql(
    job_id: UUID,
    from_statuses: Iterable[str],
    fields: dict[str, Any],
    where: dict[str, Any],
    *,
    extra_set: str = "",
    extra_where: tuple[str, list] | None = None,
) -> tuple[str, list]:
    """The UPDATE of `_update_template` with its parameters."""
    sql, set_fields, where_fields = _update_template(
        tuple(fields), tuple(where), tuple(map(str, from_statuses)), extra_set, extra_where[0] if extra_where else ""
    )
    db = _db()
    params = [field.get_db_prep_save(value, db) for field, value in zip(set_fields, fields.values(), strict=True)]
    params.append(job_id)
    params += [field.get_db_prep_value(value, db) for field, value in zip(where_fields, where.values(), strict=True)]
    if extra_where:
        params += extra_where[1]
    return sql, params


def _event_params(event: str, status: str, message: str, data: dict | None) -> list:
    db = _db()
    at = JobEvent._meta.get_field("at").get_db_prep_value(timezone.now(), db)
    return [at, event, status, message, JobEvent._meta.get_field("data").get_db_prep_value(data, db)]


def transition(
    job_id: UUID,
    from_statuses: Sequence[str],
    to: str,
    *,
    event: str,
    message: str,
    data: dict | None,
    fields: dict[str, Any],
    only_if: dict[str, Any],
    extra_set: str = "",
) -> bool:
    """Move a job from one of `from_statuses` to `to` (if `only_if` holds too), writing `fields` and the
    timeline entry `event`, in one statement. Whether it won."""
    update, update_params = update_sql(job_id, from_statuses, {"status": to, **fields}, only_if, extra_set=extra_set)
    sql = f"WITH moved AS ({update} RETURNING id) {INSERT_EVENT}SELECT id, %s, %s, %s, %s, %s FROM moved"  # noqa: S608
    with _db().cursor() as cursor:
        cursor.execute(sql, [*update_params, *_event_params(event, to, message, data)])
        return cursor.rowcount == 1


def transition_orm(
    job_id: UUID,
    from_statuses: Sequence[str],
    to: str,
    *,
    event: str,
    message: str,
    data: dict | None,
    fields: dict[str, Any],
    only_if: dict[str, Any],
    extra_set: dict[str, Any] | None = None,
) -> bool:
    """What `transition` does, through the ORM (`extra_set` as expressions)."""
    with transaction.atomic():
        won = (
            Job.objects.filter(pk=job_id, status__in=from_statuses, **only_if).update(
                status=to, **fields, **(extra_set or {})
            )
            == 1
        )
        if won:
            JobEvent.objects.create(job_id=job_id, at=timezone.now(), type=event, status=to, message=message, data=data)
    return won


CLAIMABLE = (Status.QUEUED, Status.RETRYING)


def claim(job_id: UUID | str, fields: dict[str, Any], event: str) -> Job | None:
    """Take a queued (or due retrying) job: `fields` written, attempts counted, `started_at` and
    `heartbeat_at` from the database's clock, and a timeline entry naming the attempt; the job as the
    row now is, or None if another claim won or it is not due."""
    update, update_params = update_sql(
        job_id,
        CLAIMABLE,
        fields,
        {},
        extra_set='"attempts" = "attempts" + 1, "started_at" = now(), "heartbeat_at" = now()',
        extra_where=('("run_at" IS NULL OR "run_at" <= now())', []),  # only when due
    )
    db = _db()
    at = JobEvent._meta.get_field("at").get_db_prep_value(timezone.now(), db)
    sql = (
        f"WITH moved AS ({update} RETURNING *), event AS ({INSERT_EVENT}"  # noqa: S608 (built from model metadata)
        "SELECT id, %s, %s, %s, 'attempt ' || attempts || ' on ' || worker, "
        f"jsonb_build_object('attempt', attempts) FROM moved) SELECT {returning(Job)} FROM moved"
    )
    with db.cursor() as cursor:
        cursor.execute(sql, [*update_params, at, event, Status.RUNNING])
        row = cursor.fetchone()
    return row and from_row(Job, row)


def claim_orm(job_id: UUID | str, fields: dict[str, Any], event: str) -> Job | None:
    """What `claim` does, through the ORM."""
    with transaction.atomic():
        claimed = (
            Job.objects.filter(pk=job_id, status__in=CLAIMABLE)
            .exclude(run_at__gt=Now())
            .update(attempts=F("attempts") + 1, started_at=Now(), heartbeat_at=Now(), **fields)
        )
        if claimed != 1:
            return None
        job = Job.objects.get(pk=job_id)
        JobEvent.objects.create(
            job_id=job_id,
            at=timezone.now(),
            type=event,
            status=Status.RUNNING,
            message=f"attempt {job.attempts} on {job.worker}",
            data={"attempt": job.attempts},
        )
    return job


def insert_jobs(jobs: list[Job], events: list[JobEvent]) -> None:
    """Insert new jobs with their first timeline entries: one job is one statement (its entry selected
    from the job's RETURNING, atomic by itself: outside a transaction one round trip instead of
    BEGIN, two INSERTs and COMMIT); a batch is two COPYs."""
    db = _db()
    if len(jobs) == 1:
        insert_job, job_values, job_params = insert_parts(Job, jobs[0])
        event = events[0]
        at = JobEvent._meta.get_field("at").get_db_prep_value(event.at, db)
        sql = (
            f"WITH job AS ({insert_job} VALUES ({job_values}) RETURNING id) "  # noqa: S608 (model metadata)
            f"{INSERT_EVENT}SELECT id, %s, %s, %s, '', NULL FROM job"
        )
        with db.cursor() as cursor:
            cursor.execute(sql, [*job_params, at, event.type, event.status])
        jobs[0]._state.adding, jobs[0]._state.db = False, db.alias
        return
    with transaction.atomic(savepoint=False):
        copy_insert(Job, jobs)
        copy_insert(JobEvent, events)


def insert_jobs_orm(jobs: list[Job], events: list[JobEvent]) -> None:
    """What `insert_jobs` does, through the ORM."""
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
        JobEvent.objects.bulk_create(events)


def heartbeats(attempts: Sequence[tuple[UUID, UUID]]) -> dict[tuple[UUID, UUID], bool]:
    """Renew the leases of several attempts in one statement, on the database's clock. Returns, for each
    (job, lease) still running under that lease, whether it was renewed: a row another transaction
    holds locked is skipped this time (SKIP LOCKED), not waited for, so one locked job cannot hold up
    every other job's lease. An attempt missing from the answer is no longer its own."""
    pairs = "(SELECT * FROM unnest(%s::uuid[], %s::uuid[]))"
    sql = (
        f'WITH renewed AS (UPDATE "{JOB_TABLE}" SET "heartbeat_at" = now() WHERE "id" IN ('  # noqa: S608
        f'SELECT "id" FROM "{JOB_TABLE}" WHERE ("id", "lease") IN {pairs} AND "status" = \'{Status.RUNNING}\' '
        'FOR UPDATE SKIP LOCKED) RETURNING "id") '
        f'SELECT job."id", job."lease", renewed."id" IS NOT NULL FROM "{JOB_TABLE}" job '
        'LEFT JOIN renewed ON renewed."id" = job."id" '
        f'WHERE (job."id", job."lease") IN {pairs} AND job."status" = \'{Status.RUNNING}\''
    )
    ids, leases = [job_id for job_id, _ in attempts], [lease for _, lease in attempts]
    with _db().cursor() as cursor:
        cursor.execute(sql, [ids, leases, ids, leases])
        return {(row[0], row[1]): row[2] for row in cursor.fetchall()}


def heartbeats_orm(attempts: Sequence[tuple[UUID, UUID]]) -> dict[tuple[UUID, UUID], bool]:
    """What `heartbeats` does, through the ORM."""
    held = {}
    with transaction.atomic():
        for job_id, lease in attempts:
            running = Job.objects.filter(pk=job_id, status=Status.RUNNING, lease=lease)
            if locked := running.select_for_update(skip_locked=True).values_list("pk", flat=True).first():
                Job.objects.filter(pk=locked).update(heartbeat_at=Now())
            if locked or running.exists():
                held[(job_id, lease)] = locked is not None
    return held


def db_now() -> Any:
    """The database's clock."""
    with _db().cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]
