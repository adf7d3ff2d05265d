"""The lifecycle refuses transitions the state machine does not allow, and records those it makes."""

import pytest
from django.contrib.auth.models import User

from apps.jobs import lifecycle
from apps.jobs.kinds import KINDS
from apps.jobs.models import Job
from apps.jobs.services import build_job
from tasks.execution import backoff
from tasks.handlers import HANDLERS

pytestmark = pytest.mark.django_db


def new_job(user: User) -> Job:
    return lifecycle.create_jobs([build_job(user, {"kind": "echo", "payload": {"message": "m"}})])[0]


def test_a_queued_job_cannot_be_finished_without_being_claimed(user: User) -> None:
    job = new_job(user)

    assert lifecycle.succeed(job, {"x": 1}) is False
    assert lifecycle.fail(job, "E", "boom") is False
    assert lifecycle.retry(job.pk) is False
    assert Job.objects.get(pk=job.pk).status == Job.Status.QUEUED
    assert job.events.count() == 1


def test_only_one_of_two_claims_wins(user: User) -> None:
    job = new_job(user)

    first = lifecycle.claim(job.pk, task_id="t1", worker="w1", runner="h:1")
    second = lifecycle.claim(job.pk, task_id="t2", worker="w2", runner="h:2")

    assert first is not None
    assert second is None
    assert (first.status, first.attempts, first.worker) == (Job.Status.RUNNING, 1, "w1")


def test_the_claimed_job_equals_its_stored_row(user: User) -> None:
    # The claim builds the Job from its statement's RETURNING row, converting values itself.
    spec = {"kind": "echo", "payload": {"message": 'ü \\ "q"', "sleep_ms": 5}, "run_at": None, "priority": "high"}
    job = lifecycle.create_jobs([build_job(user, spec)])[0]

    claimed = lifecycle.claim(job.pk, task_id="t1", worker="w1", runner="h:1")

    stored = Job.objects.get(pk=job.pk)
    for field in Job._meta.concrete_fields:
        assert getattr(claimed, field.attname) == getattr(stored, field.attname), field.name
    assert claimed.payload == spec["payload"]
    assert claimed.started_at.tzinfo is not None
    assert claimed._state.adding is False
    assert list(stored.events.values_list("type", "message")) == [("queued", ""), ("running", "attempt 1 on w1")]


def test_a_finished_attempt_of_another_process_is_refused(user: User) -> None:
    job = lifecycle.claim(new_job(user).pk, task_id="t1", worker="w1", runner="h:1")
    job.runner = "h:2"  # a stale process that lost the job

    assert lifecycle.succeed(job, {}) is False
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING


def test_a_lost_job_out_of_attempts_is_dead_lettered(user: User) -> None:
    job = lifecycle.claim(new_job(user).pk, task_id="t1", worker="w1", runner="h:1")
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    job.refresh_from_db()

    assert lifecycle.recover_lost(job, "worker lost") == Job.Status.FAILED
    job.refresh_from_db()
    assert job.dead_lettered is True
    assert job.error == {"type": "WorkerLost", "message": "worker lost on attempt 1 of 1"}


def test_backoff_grows_exponentially_under_its_cap_and_honours_retry_after(settings: object) -> None:
    settings.JOBS_RETRY_BASE_SECONDS, settings.JOBS_RETRY_MAX_SECONDS = 1.0, 10.0

    assert all(0 <= backoff(1) <= 1 for _ in range(50))
    assert all(0 <= backoff(3) <= 4 for _ in range(50))
    assert all(backoff(20) <= 10 for _ in range(50))
    assert max(backoff(3) for _ in range(200)) > 1  # jitter spreads over the whole window
    assert backoff(5, retry_after=7) == 7


def test_every_kind_has_a_handler() -> None:
    assert set(HANDLERS) == set(KINDS)
