"""How attempts in threads are stopped, under the faults an adversarial review found: a cold shutdown of
a threads worker, two attempts of one job in one process, one job's row locked by another transaction."""

import copy
import os
import signal
import threading
import uuid

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection
from rest_framework.test import APIClient

from apps.jobs import lifecycle
from apps.jobs.models import Job
from tasks import execution
from tasks.leases import Heartbeat, Reporter
from tests.conftest import WorkerProcess, wait_final, wait_for
from tests.factories import make_job, submit
from tests.test_threads_pool import running, threads_worker  # noqa: F401 (the fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_cold_shutdown_of_a_threads_worker_hands_its_jobs_back_at_once(
    threads_worker: WorkerProcess,  # noqa: F811
    api: APIClient,
) -> None:
    job_id = submit(api, "echo", {"message": "m", "sleep_ms": 60_000})["id"]
    running(job_id)

    os.kill(threads_worker.proc.pid, signal.SIGQUIT)  # Celery's cold shutdown
    threads_worker.proc.wait(20)  # not the minute the job would sleep

    job = Job.objects.get(pk=job_id)
    assert (job.status, job.attempts, job.handbacks) == ("queued", 0, 1)  # back, the attempt not counted
    assert threads_worker.proc.returncode is not None
    threads_worker.start()
    assert wait_final(job_id, timeout=90).status == "succeeded"


@pytest.mark.usefixtures("no_shared_worker")
def test_two_attempts_of_one_job_in_one_process_are_watched_apart(user: User) -> None:
    job = make_job(user)
    first, second = copy.copy(job), copy.copy(job)
    first.lease, first.task_id, second.lease, second.task_id = uuid.uuid4(), "t1", uuid.uuid4(), "t2"
    heartbeat = Heartbeat.get()

    with heartbeat.watch(second, Reporter(second), lambda reason: None) as watched_second:
        with heartbeat.watch(first, Reporter(first), lambda reason: None):
            assert len(Heartbeat.watching(str(job.pk))) == 2
        # The first attempt's end leaves the second one watched (its lease renewed, its cancel heard).
        assert Heartbeat.watching(str(job.pk)) == [watched_second]
        assert Heartbeat.watching(str(job.pk), "t2") == [watched_second]
    assert Heartbeat.watching(str(job.pk)) == []


@pytest.mark.usefixtures("no_shared_worker")
def test_a_job_whose_row_is_locked_elsewhere_holds_up_no_other_jobs_lease_or_deadline(user: User) -> None:
    locked_job = make_job(user, payload={"sleep_ms": 20_000})
    other = make_job(user, payload={"sleep_ms": 20_000}, timeout_seconds=1)
    ended: dict[str, str | None] = {}
    threads = [
        threading.Thread(
            target=lambda j=j: ended.update({str(j.pk): execution.run(str(j.pk), task_id="t", worker="w")})
        )
        for j in (locked_job, other)
    ]
    for thread in threads:
        thread.start()
    running(str(locked_job.pk))
    started = running(str(other.pk)).started_at

    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"], port=settings["PORT"], user=settings["USER"], dbname=settings["NAME"]
    ) as db:
        db.execute("SELECT 1 FROM jobs_job WHERE id = %s FOR UPDATE", [locked_job.pk])
        beat_before = Job.objects.get(pk=other.pk).heartbeat_at
        wait_for(lambda: Job.objects.get(pk=other.pk).heartbeat_at > beat_before, timeout=3, what="the other lease")
        threads[1].join(3)  # its deadline is kept while the lock is held
        assert not threads[1].is_alive()
    stored = Job.objects.get(pk=other.pk)
    assert ended[str(other.pk)] == "timed_out"
    assert (stored.finished_at - started).total_seconds() < 2.5

    # The locked job was only skipped (for less than the lease allows), never taken for lost: it still
    # runs, and a cancel reaches it.
    assert Job.objects.get(pk=locked_job.pk).status == "running"
    lifecycle.cancel(locked_job.pk)
    threads[0].join(5)
    assert ended[str(locked_job.pk)] == "cancelled"
