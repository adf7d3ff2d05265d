"""A worker on a threads pool (`-P threads`, for the I/O-bound `ai` and `messages` queues): Celery's
signals and time limits do not reach a thread, so cancels, deadlines and lost leases stop the job in
place, and the provider's stream is cut at once."""

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from rest_framework.test import APIClient

from apps.jobs.models import Job
from tasks import execution
from tests.conftest import WorkerProcess, wait_final, wait_for
from tests.factories import make_job, submit
from tests.fake_llm import FakeLLM

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def threads_worker(no_shared_worker: None, process_env: dict, tmp_path: Path) -> Iterator[WorkerProcess]:
    """The only worker: 8 threads, sharing a pool of 4 database connections (as a threads worker is
    meant to run: `DB_POOL_SIZE`), so jobs that stream do not hold a connection each."""
    env = {**process_env, "DB_POOL_SIZE": "4"}
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=("-P", "threads", "-c", "8"))
    worker.start()
    yield worker
    worker.stop()


def running(job_id: str) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).first(), what="the job to run")


@pytest.mark.usefixtures("threads_worker")
def test_a_cancel_stops_a_streaming_ai_job_at_once_and_the_worker_goes_on(api: APIClient, llm: FakeLLM) -> None:
    llm.reset(tokens=["word "] * 400, token_delay=0.05)  # 20 s of answer
    job_id = submit(api, "ai_generate", {"prompt": "long", "dedupe": False}, shortcut=True)["id"]
    running(job_id)
    wait_for(lambda: llm.requests and llm.requests[-1].first_token_at, what="the answer to start")

    cancelled_at = time.monotonic()
    assert api.post(f"/api/jobs/{job_id}/cancel/").status_code == 200
    wait_for(lambda: llm.requests[-1].aborted, timeout=3, what="the provider's stream to be cut")
    assert time.monotonic() - cancelled_at < 3

    job = wait_final(job_id)
    assert (job.status, job.attempts, job.result) == ("cancelled", 1, None)
    llm.reset()
    after = submit(api, "ai_generate", {"prompt": "next", "dedupe": False}, shortcut=True)["id"]
    assert wait_final(after).status == "succeeded"


@pytest.mark.usefixtures("threads_worker")
def test_an_ai_job_past_its_timeout_is_timed_out_without_celerys_time_limits(api: APIClient, llm: FakeLLM) -> None:
    llm.reset(tokens=["word "] * 100, token_delay=0.2)  # 20 s of answer, a token every 0.2 s
    request = {"prompt": "slow", "dedupe": False}
    job_id = submit(api, "ai_generate", request, shortcut=True, timeout_seconds=2, max_attempts=3)["id"]

    job = wait_final(job_id, timeout=10)

    assert (job.status, job.attempts, job.dead_lettered) == ("timed_out", 1, True)
    assert (job.finished_at - job.started_at).total_seconds() < 3.5
    wait_for(lambda: llm.requests[-1].aborted, timeout=3, what="the provider's stream to be cut")


@pytest.mark.usefixtures("threads_worker")
def test_jobs_run_side_by_side_and_a_cancel_wakes_a_sleeping_one(api: APIClient) -> None:
    spec = {"kind": "echo", "payload": {"message": "m", "sleep_ms": 20_000}}
    ids = [job["id"] for job in api.post("/api/jobs/batch/", {"jobs": [spec] * 6}, format="json").json()["jobs"]]
    wait_for(lambda: Job.objects.filter(pk__in=ids, status=Job.Status.RUNNING).count() == 6, what="six at once")

    started = time.monotonic()
    for job_id in ids:
        assert api.post(f"/api/jobs/{job_id}/cancel/").status_code == 200

    jobs = [wait_final(job_id, timeout=5) for job_id in ids]
    assert {(job.status, job.attempts) for job in jobs} == {("cancelled", 1)}
    assert time.monotonic() - started < 5  # not the 20 s they would have slept


@pytest.mark.usefixtures("no_shared_worker")
@override_settings(JOBS_HEARTBEAT_SECONDS=0.2)
def test_an_attempt_in_a_thread_stops_when_its_lease_is_taken_over(user: User) -> None:
    job = make_job(user, payload={"sleep_ms": 20_000})
    ended: list[str | None] = []
    thread = threading.Thread(target=lambda: ended.append(execution.run(str(job.pk), task_id="t", worker="w")))
    thread.start()
    running(str(job.pk))

    taken_over_by = uuid.uuid4()  # what another worker's claim leaves, once this one's lease ran out
    Job.objects.filter(pk=job.pk).update(lease=taken_over_by)
    thread.join(5)

    assert not thread.is_alive()
    assert ended == [None]  # stopped, and it settled nothing
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.lease, stored.result) == ("running", taken_over_by, None)
