"""The hand-written hot-path statements (`apps/jobs/sql.py`) against the plain ORM definition written
beside each (`*_orm`): on twin jobs, both leave the same rows and the same timeline entries."""

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from apps.jobs import lifecycle, sql
from apps.jobs.models import Job, JobEvent, Status
from apps.jobs.services import build_job

pytestmark = pytest.mark.django_db

# What differs between twins by construction: their ids and the moments they were written.
MOMENTS = {"id", "created_at", "queued_at", "started_at", "finished_at", "heartbeat_at", "lease"}


def twins(user: User, count: int = 1) -> tuple[list[Job], list[Job]]:
    """`count` queued jobs inserted by `insert_jobs`, and as many by `insert_jobs_orm`, alike but for their
    ids. (The inserts are what is tested here, so these rows are made as `lifecycle.create_jobs` makes
    them rather than by it.)"""
    made: list[list[Job]] = []
    for insert in (sql.insert_jobs, sql.insert_jobs_orm):
        jobs = [build_job(user, {"kind": "echo", "payload": {"message": "m"}}) for _ in range(count)]
        now = timezone.now()
        for job in jobs:
            job.created_at, job.queued_at, job.status, job.queue = now, now, Status.QUEUED, "default"
        insert(jobs, [JobEvent(job_id=job.id, at=now, type=job.status, status=job.status) for job in jobs])
        made.append(jobs)
    return made[0], made[1]


def row(job_id: uuid.UUID) -> dict:
    values = Job.objects.filter(pk=job_id).values().get()
    return {name: value for name, value in values.items() if name not in MOMENTS}


def timeline(job_id: uuid.UUID) -> list[tuple]:
    return list(JobEvent.objects.filter(job_id=job_id).order_by("id").values_list("type", "status", "message", "data"))


def assert_alike(a: uuid.UUID, b: uuid.UUID) -> None:
    assert row(a) == row(b)
    assert timeline(a) == timeline(b)
    assert timeline(a)  # a comparison of nothing proves nothing


@pytest.mark.parametrize("count", [1, 3], ids=["one statement", "COPY"])
def test_insert_jobs_leaves_what_the_orm_leaves(user: User, count: int) -> None:
    hand, orm = twins(user, count)

    for a, b in zip(hand, orm, strict=True):
        assert_alike(a.pk, b.pk)


def test_claim_leaves_what_the_orm_leaves_and_only_one_claim_wins(user: User) -> None:
    (hand,), (orm,) = twins(user)
    fields = {"status": Status.RUNNING, "worker": "w1", "process": "h:1@x", "task_id": "t", "lease": uuid.uuid4()}

    claimed = [claim(job.pk, fields, "running") for claim, job in ((sql.claim, hand), (sql.claim_orm, orm))]

    assert [job.attempts for job in claimed] == [1, 1]
    assert_alike(hand.pk, orm.pk)
    assert sql.claim(hand.pk, fields, "running") is None
    assert sql.claim_orm(orm.pk, fields, "running") is None


@pytest.mark.parametrize(
    ("from_statuses", "only_if", "wins"),
    [([Status.RUNNING], {"worker": "w1"}, True), ([Status.RUNNING], {"worker": "another"}, False)],
    ids=["its condition holds", "its condition fails"],
)
def test_a_transition_leaves_what_the_orm_leaves(
    user: User, from_statuses: list[str], only_if: dict, wins: bool
) -> None:
    (hand,), (orm,) = twins(user)
    for job in (hand, orm):
        assert lifecycle.claim(job.pk, task_id="t", worker="w1", process="h:1@x") is not None
    move: dict[str, object] = {
        "event": "succeeded",
        "message": "done",
        "data": {"attempt": 1},
        "fields": {"result": {"text": "x"}, "progress": 100},
        "only_if": only_if,
    }
    transitions: list[Callable[..., bool]] = [sql.transition, sql.transition_orm]

    won = [t(job.pk, from_statuses, Status.SUCCEEDED, **move) for t, job in zip(transitions, (hand, orm), strict=True)]

    assert won == [wins, wins]
    assert_alike(hand.pk, orm.pk)
    assert Job.objects.get(pk=hand.pk).status == (Status.SUCCEEDED if wins else Status.RUNNING)


def test_renewing_leases_at_once_answers_what_the_orm_answers(user: User) -> None:
    for renew in (sql.heartbeats, sql.heartbeats_orm):
        (held,), (taken_over,) = twins(user)
        (finished,), _ = twins(user)
        for job in (held, taken_over, finished):
            lifecycle.claim(job.pk, task_id="t", worker="w1", process="h:1@x")
        held, taken_over, finished = (Job.objects.get(pk=job.pk) for job in (held, taken_over, finished))
        lifecycle.succeed(finished, {"ok": True})
        stale = uuid.uuid4()  # the lease of an attempt whose job another claim took since
        long_ago = timezone.now() - timedelta(minutes=5)  # (now() is the test transaction's start)
        Job.objects.filter(pk=held.pk).update(heartbeat_at=long_ago)

        answer = renew([(held.pk, held.lease), (taken_over.pk, stale), (finished.pk, finished.lease)])

        assert answer == {(held.pk, held.lease): True}, renew.__name__
        assert Job.objects.get(pk=held.pk).heartbeat_at > long_ago
