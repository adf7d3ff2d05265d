"""Jobs through a real Celery worker process, real Redis and real PostgreSQL."""

import os
import signal
import subprocess
import sys

import pytest
import redis
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from apps.jobs.dispatch import publish
from apps.jobs.models import Job
from apps.jobs.reconciler import reconcile
from tests.conftest import ROOT, WorkerProcess, purge_broker, wait_final, wait_for
from tests.factories import submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.broker]


def event_types(job_id: str) -> list[str]:
    return list(Job.objects.get(pk=job_id).events.values_list("type", flat=True))


def wait_running(job_id: str, process_other_than: str = "") -> Job:
    return wait_for(
        lambda: (
            (job := Job.objects.get(pk=job_id)).status == Job.Status.RUNNING
            and job.process != process_other_than
            and job
        ),
        what=f"job {job_id} to start",
    )


def test_an_echo_job_runs_on_the_worker_and_records_its_timeline(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "round trip"})["id"]

    job = wait_final(job_id)

    assert job.status == Job.Status.SUCCEEDED
    assert job.result == {"message": "round trip"}
    assert job.attempts == 1
    assert job.progress == 100
    assert job.worker.startswith("test-")
    assert job.started_at >= job.queued_at
    assert job.finished_at >= job.started_at
    assert event_types(job_id) == ["queued", "running", "succeeded"]
    body = api.get(f"/api/jobs/{job_id}/").json()
    assert body["status"] == "succeeded"
    assert body["result"] == {"message": "round trip"}


def test_progress_is_reported_while_the_job_runs(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 3000, "progress_steps": 6})["id"]

    midway = wait_for(lambda: (j := Job.objects.get(pk=job_id)).status == "running" and 0 < j.progress < 100 and j)

    assert midway.progress_message.startswith("step ")
    job = wait_final(job_id)
    assert (job.progress, job.progress_message) == (100, "step 6 of 6")


def test_a_retryable_failure_is_retried_with_backoff_until_it_succeeds(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "fail_times": 2}, max_attempts=3)["id"]

    job = wait_final(job_id)

    assert job.status == Job.Status.SUCCEEDED
    assert job.attempts == 3
    assert event_types(job_id) == ["queued", "running", "retrying", "running", "retrying", "running", "succeeded"]
    delays = [e.data["delay_s"] for e in job.events.filter(type="retrying")]
    assert all(0 <= d <= settings.JOBS_RETRY_MAX_SECONDS for d in delays)


def test_the_last_failed_attempt_dead_letters_the_job_and_replay_runs_it_again(
    worker: WorkerProcess, api: APIClient
) -> None:
    job_id = submit(api, "echo", {"message": "m", "fail_times": 10}, max_attempts=2)["id"]

    job = wait_final(job_id)
    assert job.status == Job.Status.FAILED
    assert job.dead_lettered is True
    assert job.attempts == 2
    assert job.error["type"] == "RetryableError"
    assert "gave up after 2 attempts" in job.error["message"]
    dead = api.get("/api/jobs/", {"dead_lettered": "true"}).json()["results"]
    assert [j["id"] for j in dead] == [job_id]

    replayed = api.post(f"/api/jobs/{job_id}/retry/")
    assert replayed.status_code == 200
    assert replayed.json()["status"] in ("queued", "running")  # the worker may have taken it already
    assert replayed.json()["dead_lettered"] is False

    wait_for(lambda: event_types(job_id).count("running") == 4, what="the replay to run two more attempts")
    job = wait_final(job_id)
    assert job.status == Job.Status.FAILED
    assert job.attempts == 2
    assert "retried" in event_types(job_id)


def test_a_duplicate_message_never_runs_a_job_twice(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 500})["id"]
    job = Job.objects.get(pk=job_id)

    publish([job, job, job])
    job = wait_final(job_id)
    wait_for(
        lambda: worker.log_path.read_text(errors="replace").count(f"job {job_id} not claimable") == 3,
        what="the three duplicates to be delivered and refused",
    )

    assert job.status == Job.Status.SUCCEEDED
    assert job.attempts == 1
    assert event_types(job_id).count("running") == 1


def test_a_job_over_its_timeout_is_timed_out(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 20_000}, timeout_seconds=1)["id"]

    job = wait_final(job_id, timeout=15)

    assert job.status == Job.Status.TIMED_OUT
    assert job.error == {"type": "TimeoutError", "message": "timed out after 1s"}
    assert job.dead_lettered is True
    assert job.finished_at - job.started_at < __import__("datetime").timedelta(seconds=5)


def test_cancelling_a_running_job_stops_it_within_seconds(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 60_000})["id"]
    wait_running(job_id)

    response = api.post(f"/api/jobs/{job_id}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # Its pool process is free again: two quick jobs finish at once on the two-process worker.
    quick = [submit(api)["id"], submit(api)["id"]]
    for other in quick:
        assert wait_final(other, timeout=10).status == Job.Status.SUCCEEDED
    job = Job.objects.get(pk=job_id)
    assert job.status == Job.Status.CANCELLED
    assert job.result is None
    assert event_types(job_id) == ["queued", "running", "cancelled"]
    # On prefork the cancel reaches the attempt as SIGTERM to its own pool process (not only at its
    # next heartbeat).
    stopped = f"job {job_id}: its attempt stopped by SIGTERM to pool process"
    wait_for(lambda: stopped in worker.log_path.read_text(errors="replace"), timeout=5, what="the SIGTERM")


def test_a_cancelled_queued_job_never_starts(worker: WorkerProcess, api: APIClient) -> None:
    blockers = [submit(api, "echo", {"message": "m", "sleep_ms": 60_000})["id"] for _ in range(2)]
    for blocker in blockers:
        wait_running(blocker)
    waiting = submit(api)["id"]

    assert api.post(f"/api/jobs/{waiting}/cancel/").json()["status"] == "cancelled"
    for blocker in blockers:
        api.post(f"/api/jobs/{blocker}/cancel/")
    after = submit(api)["id"]
    wait_final(after)

    job = Job.objects.get(pk=waiting)
    assert job.status == Job.Status.CANCELLED
    assert job.started_at is None
    assert event_types(waiting) == ["queued", "cancelled"]


def test_a_critical_job_overtakes_a_backlog_of_normal_ones(worker: WorkerProcess, api: APIClient) -> None:
    backlog = api.post(
        "/api/jobs/batch/",
        {"jobs": [{"kind": "echo", "payload": {"message": "n", "sleep_ms": 100}}] * 30},
        format="json",
    ).json()["jobs"]
    wait_for(lambda: Job.objects.filter(status="running").exists())
    critical = submit(api, priority="critical")["id"]

    critical_job = wait_final(critical)
    ids = [j["id"] for j in backlog]
    started_before = Job.objects.filter(pk__in=ids, started_at__lt=critical_job.started_at).count()

    assert started_before <= 6, f"{started_before} normal jobs started before the critical one"
    for job_id in ids:
        wait_final(job_id)


def test_a_worker_killed_mid_job_leaves_a_job_that_runs_again_and_finishes_once(
    worker: WorkerProcess, api: APIClient
) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 3000})["id"]
    wait_running(job_id)

    worker.kill()
    worker.start()
    job = wait_for(lambda: (reconcile() and False) or ((j := Job.objects.get(pk=job_id)).is_final and j), timeout=30)

    assert job.status == Job.Status.SUCCEEDED
    assert job.attempts == 2
    types = event_types(job_id)
    assert types == ["queued", "running", "requeued", "running", "succeeded"]
    assert "worker lost" in job.events.get(type="requeued").message


def test_a_job_that_kills_itsshared_worker_every_time_is_dead_lettered(worker: WorkerProcess, api: APIClient) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 30_000}, max_attempts=2)["id"]

    process = ""
    for _ in range(2):
        process = wait_running(job_id, process_other_than=process).process
        os.kill(int(process.partition("@")[0].rpartition(":")[2]), signal.SIGKILL)
    job = wait_final(job_id)

    assert job.status == Job.Status.FAILED
    assert job.dead_lettered is True
    assert job.attempts == 2
    assert job.error["type"] == "WorkerLost"
    assert event_types(job_id) == ["queued", "running", "requeued", "running", "failed"]


def test_queued_jobs_survive_the_broker_being_wiped(
    worker: WorkerProcess, api: APIClient, process_env: dict, tmp_path: object
) -> None:
    worker.stop()
    ids = [submit(api)["id"] for _ in range(10)]
    if settings.BROKER_IS_REDIS:
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushall()
    else:
        purge_broker()  # RabbitMQ: every queue emptied
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "WARNING", "-s", str(tmp_path / "schedule")],
        cwd=ROOT, env={**process_env, "JOBS_RECONCILE_INTERVAL_SECONDS": "1"},
    )  # fmt: skip
    try:
        worker.start()
        jobs = [wait_final(job_id, timeout=30) for job_id in ids]
    finally:
        beat.terminate()
        beat.wait(10)

    assert {job.status for job in jobs} == {Job.Status.SUCCEEDED}
    assert all(job.attempts == 1 for job in jobs)
    assert all(job.redispatched_at is not None for job in jobs)


def test_a_worker_whose_database_connections_were_cut_claims_on_a_new_one(
    worker: WorkerProcess, api: APIClient
) -> None:
    assert wait_final(submit(api)["id"]).status == Job.Status.SUCCEEDED  # the pool processes hold connections now
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cursor.fetchone()[0] >= 1

    jobs = [submit(api, "echo", {"message": f"after {i}"})["id"] for i in range(4)]

    for job_id in jobs:
        job = wait_final(job_id)
        assert (job.status, job.attempts) == (Job.Status.SUCCEEDED, 1)
