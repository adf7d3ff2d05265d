"""One attempt, run in this process (tasks.execution.run, as the Celery task calls it): how each way an
attempt can end is recorded, whatever a handler, an SDK or the database does."""

import time
from collections.abc import Callable

import pytest
from celery.exceptions import Reject
from django.contrib.auth.models import User
from django.db import DataError, OperationalError
from rest_framework.test import APIClient

from apps.jobs import lifecycle
from apps.jobs.models import Job
from tasks import execution
from tasks.context import Context, JobInterrupted, RetryableError
from tasks.kinds import HANDLERS
from tests.conftest import WorkerProcess, wait_final
from tests.factories import make_job, submit
from tests.fake_llm import FakeLLM

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_worker(no_shared_worker: None) -> None:
    """These attempts run in this process: no worker may take their jobs first."""


def attempt(job: Job, handler: Callable, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setitem(HANDLERS, "echo", handler)
    return execution.run(str(job.pk), task_id="t1", worker="w1")


@pytest.mark.usefixtures("no_worker")
def test_an_error_after_the_deadline_is_a_timeout_never_a_retry(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    def sdk_that_turns_the_time_limit_into_a_connection_error(ctx: Context) -> dict:
        time.sleep(1.1)
        raise RetryableError("anthropic: connection failed: the soft time limit")

    job = make_job(user, timeout_seconds=1, max_attempts=3)

    assert attempt(job, sdk_that_turns_the_time_limit_into_a_connection_error, monkeypatch) == "timed_out"

    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.attempts, stored.dead_lettered) == ("timed_out", 1, True)
    assert stored.error == {"type": "TimeoutError", "message": "timed out after 1s"}


@pytest.mark.usefixtures("no_worker")
def test_the_hard_time_limits_signal_after_the_deadline_times_the_job_out(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cleanup_that_outlasts_the_grace(ctx: Context) -> dict:
        time.sleep(1.1)
        raise JobInterrupted("stopped by signal SIGTERM")

    job = make_job(user, timeout_seconds=1, max_attempts=3)

    assert attempt(job, cleanup_that_outlasts_the_grace, monkeypatch) == "timed_out"
    assert Job.objects.get(pk=job.pk).attempts == 1


@pytest.mark.usefixtures("no_worker")
def test_a_stop_before_the_deadline_hands_the_job_back(user: User, monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(ctx: Context) -> dict:
        raise JobInterrupted("stopped by signal SIGTERM")

    job = make_job(user, max_attempts=1)

    assert attempt(job, stopped, monkeypatch) == "queued"
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.attempts, stored.handbacks) == ("queued", 0, 1)


@pytest.mark.usefixtures("no_worker")
def test_a_result_the_database_refuses_ends_the_job_failed_with_the_reason(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object, **kwargs: object) -> bool:
        raise DataError("unsupported Unicode escape sequence")

    monkeypatch.setattr(lifecycle, "succeed", refused)
    job = make_job(user)

    assert attempt(job, lambda ctx: {"text": "x"}, monkeypatch) == "failed"

    stored = Job.objects.get(pk=job.pk)
    assert stored.error == {
        "type": "UnstorableResult",
        "message": "the result could not be stored: unsupported Unicode escape sequence",
    }
    assert stored.lease is None


@pytest.mark.usefixtures("no_worker")
def test_an_outcome_that_cannot_be_written_leaves_the_message_unacknowledged(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []

    def database_away(*args: object, **kwargs: object) -> bool:
        writes.append(time.monotonic())
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(lifecycle, "succeed", database_away)
    monkeypatch.setattr(execution, "WRITE_PAUSE", 0.01)
    job = make_job(user)

    with pytest.raises(Reject) as rejected:
        attempt(job, lambda ctx: {"ok": True}, monkeypatch)

    assert rejected.value.requeue is True
    assert len(writes) == execution.WRITE_TRIES
    assert Job.objects.get(pk=job.pk).status == "running"  # its lease runs out; the reconciler settles it


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_provider_that_hangs_past_the_deadline_times_the_job_out(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM, provider: str
) -> None:
    llm.reset(response_delay=15)
    request = {"prompt": f"hang {provider}", "provider": provider}
    job_id = submit(api, "ai_generate", request, shortcut=True, timeout_seconds=2, max_attempts=3)["id"]

    job = wait_final(job_id, timeout=30)

    timeline = list(job.events.values_list("type", "message"))
    assert job.status == Job.Status.TIMED_OUT, timeline
    assert job.attempts == 1, timeline
    assert job.error == {"type": "TimeoutError", "message": "timed out after 2s"}
    assert "retrying" not in job.events.values_list("type", flat=True)


def test_a_nul_in_a_providers_reply_is_kept_and_the_job_succeeds(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    llm.reset(tokens=["before", "\x00", "after"])
    job_id = submit(api, "ai_generate", {"prompt": "nul", "provider": "openai"}, shortcut=True)["id"]

    job = wait_final(job_id, timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.attempts == 1
    assert job.result["text"] == "before\ufffdafter"
