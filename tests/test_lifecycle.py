"""The lifecycle refuses transitions the state machine does not allow, and records those it makes."""

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection

from apps.jobs import lifecycle
from apps.jobs.kinds import KINDS
from apps.jobs.models import Job
from tasks.kinds import HANDLERS
from tests.factories import make_job

pytestmark = pytest.mark.django_db


def test_a_queued_job_cannot_be_finished_without_being_claimed(user: User) -> None:
    job = make_job(user)

    assert lifecycle.succeed(job, {"x": 1}) is False
    assert lifecycle.end_attempt(job, "E", "boom", retryable=False) is None
    assert lifecycle.replay(job.pk) is False
    assert Job.objects.get(pk=job.pk).status == Job.Status.QUEUED
    assert job.events.count() == 1


def test_only_one_of_two_claims_wins(user: User) -> None:
    job = make_job(user)

    first = lifecycle.claim(job.pk, task_id="t1", worker="w1", process="h:1")
    second = lifecycle.claim(job.pk, task_id="t2", worker="w2", process="h:2")

    assert first is not None
    assert second is None
    assert (first.status, first.attempts, first.worker) == (Job.Status.RUNNING, 1, "w1")


def test_the_claimed_job_equals_its_stored_row(user: User) -> None:
    # The claim builds the Job from its statement's RETURNING row, converting values itself.
    payload = {"message": 'ü \\ "q"', "sleep_ms": 5}
    job = make_job(user, payload=payload, run_at=None, priority="high")

    claimed = lifecycle.claim(job.pk, task_id="t1", worker="w1", process="h:1")

    stored = Job.objects.get(pk=job.pk)
    for field in Job._meta.concrete_fields:
        assert getattr(claimed, field.attname) == getattr(stored, field.attname), field.name
    assert claimed.payload == payload
    assert claimed.started_at.tzinfo is not None
    assert claimed._state.adding is False
    assert list(stored.events.values_list("type", "message")) == [("queued", ""), ("running", "attempt 1 on w1")]


def test_a_finished_attempt_of_another_process_is_refused(user: User) -> None:
    job = make_job(user, Job.Status.RUNNING)
    job.lease = uuid.uuid4()  # a stale attempt that lost the job

    assert lifecycle.succeed(job, {}) is False
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING


def test_a_lost_job_out_of_attempts_is_dead_lettered(user: User) -> None:
    job = make_job(user, Job.Status.RUNNING, max_attempts=1)

    assert lifecycle.recover_lost(job, "worker lost") == Job.Status.FAILED
    job.refresh_from_db()
    assert job.dead_lettered is True
    assert job.error == {"type": "WorkerLost", "message": "worker lost on attempt 1 of 1"}


def test_every_kind_has_a_handler() -> None:
    assert set(HANDLERS) == set(KINDS)


def test_an_attempt_taken_over_writes_nothing_more(user: User) -> None:
    first = make_job(user, Job.Status.RUNNING)
    Job.objects.filter(pk=first.pk).update(heartbeat_at=first.heartbeat_at - timedelta(hours=1))
    assert lifecycle.recover_lost(Job.objects.get(pk=first.pk), "lease ran out") == Job.Status.QUEUED
    second = lifecycle.claim(first.pk, task_id="t2", worker="w2", process="h:2")

    assert second.lease != first.lease
    assert lifecycle.heartbeats([first]) == {}  # its lease is not renewed: it is not held
    lifecycle.set_progress(first, 50, "stale")
    assert lifecycle.succeed(first, {"stale": True}) is False
    assert lifecycle.end_attempt(first, "E", "stale", retryable=True) is None
    stored = Job.objects.get(pk=first.pk)
    assert (stored.status, stored.attempts, stored.progress, stored.result) == (Job.Status.RUNNING, 2, 0, None)
    assert lifecycle.succeed(second, {"ok": True}) is True


def test_the_lease_is_stamped_by_the_databases_clock(user: User) -> None:
    job = make_job(user, Job.Status.RUNNING)
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        db_now = cursor.fetchone()[0]

    assert abs((job.heartbeat_at - db_now).total_seconds()) < 5
    assert job.started_at == job.heartbeat_at  # one statement, one clock reading


@pytest.mark.parametrize(
    ("retryable", "attempts", "max_attempts", "expected"),
    [
        (True, 1, 3, Job.Status.RETRYING),
        (True, 3, 3, Job.Status.FAILED),
        (False, 1, 3, Job.Status.FAILED),
    ],
)
def test_one_function_decides_what_follows_a_failed_attempt(
    user: User, retryable: bool, attempts: int, max_attempts: int, expected: str
) -> None:
    job = make_job(user, Job.Status.RUNNING, attempts=attempts, max_attempts=max_attempts)

    assert lifecycle.end_attempt(job, "E", "boom", retryable=retryable) == expected

    stored = Job.objects.get(pk=job.pk)
    assert stored.status == expected
    assert stored.dead_lettered is (expected == Job.Status.FAILED)
    assert stored.lease is None


def test_a_timed_out_attempt_is_timed_out_whatever_attempts_are_left(user: User) -> None:
    job = make_job(user, Job.Status.RUNNING, max_attempts=5)

    assert lifecycle.end_attempt(job, "RetryableError", "conn reset", retryable=True, timed_out=True) == "timed_out"
    assert Job.objects.get(pk=job.pk).error == {"type": "TimeoutError", "message": "timed out after 60s"}


def test_a_hand_back_does_not_count_as_an_attempt_a_bounded_number_of_times(user: User, settings: object) -> None:
    settings.JOBS_MAX_HANDBACKS = 2
    job = make_job(user)
    for handed in (1, 2):
        running = lifecycle.claim(job.pk, task_id="t", worker="w", process="h:1")
        assert lifecycle.hand_back(running, "worker shutting down") == Job.Status.QUEUED
        stored = Job.objects.get(pk=job.pk)
        assert (stored.status, stored.attempts, stored.handbacks) == (Job.Status.QUEUED, 0, handed)

    running = lifecycle.claim(job.pk, task_id="t", worker="w", process="h:1")
    assert lifecycle.hand_back(running, "worker shutting down") == Job.Status.QUEUED
    assert Job.objects.get(pk=job.pk).attempts == 1  # the third hand-back counted


def test_what_the_database_cannot_hold_is_cleaned_before_it_is_written(user: User) -> None:
    job = make_job(user, Job.Status.RUNNING)

    assert lifecycle.succeed(job, {"text": "a\x00b\ud800", "score": float("nan"), "ok": [1.5, float("inf")]})

    assert Job.objects.get(pk=job.pk).result == {"text": "a\ufffdb\ufffd", "score": None, "ok": [1.5, None]}
