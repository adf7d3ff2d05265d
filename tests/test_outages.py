"""The API and the workers through an outage of Redis (the broker, live events, throttling counters)
and of PostgreSQL: each on a server of the test's own, which it stops and starts again."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import override_settings
from rest_framework.test import APIClient

from apps.jobs.models import Job
from tests.conftest import (
    ROOT,
    BeatProcess,
    PrivatePostgres,
    PrivateRedis,
    Web,
    WorkerProcess,
    publishing_to,
    wait_final,
    wait_for,
)
from tests.factories import submit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.usefixtures("no_shared_worker")
def test_the_api_answers_while_redis_is_down_and_every_job_runs_once_it_is_back(
    process_env: dict, api: APIClient, user: User, tmp_path: Path
) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()
    cache = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis.url}}
    with publishing_to(redis.url), override_settings(CACHES=cache, REDIS_URL=redis.url, JOBS_SUBMIT_RATE="5/min"):
        before = submit(api, "echo", {"message": "before the outage"})["id"]
        redis.stop()

        started = time.monotonic()
        during = [submit(api, "echo", {"message": f"during {i}"}, expect=201)["id"] for i in range(5)]
        slowest = (time.monotonic() - started) / 5
        listed = api.get("/api/jobs/")
        one = api.get(f"/api/jobs/{before}/")
        cancelled = api.post(f"/api/jobs/{during[-1]}/cancel/")
        health = api.get("/api/health/")
        # The 6th during the outage: throttled, counted in this process.
        submit(api, "echo", {"message": "one too many"}, expect=429)

        redis.start()
        env = {**process_env, "REDIS_URL": redis.url, "JOBS_RECONCILE_INTERVAL_SECONDS": "1"}
        worker, beat = WorkerProcess(env, tmp_path / "worker.log"), BeatProcess(env, tmp_path)
        worker.start()
        beat.start()
        try:
            ran = [wait_final(job_id, timeout=60) for job_id in [before, *during[:-1]]]
        finally:
            beat.stop()
            worker.stop()
            redis.stop()

    assert slowest < 3, f"{slowest:.1f}s per submission"
    assert (listed.status_code, one.status_code) == (200, 200)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert health.status_code == 503
    assert health.json()["broker"].startswith("error")
    assert {job.status for job in ran} == {Job.Status.SUCCEEDED}
    assert all(job.attempts == 1 for job in ran)


@pytest.mark.usefixtures("no_shared_worker")
def test_while_postgresql_is_down_the_api_answers_503_in_json_and_every_job_ends_once_it_is_back(
    process_env: dict, tmp_path: Path
) -> None:
    database = PrivatePostgres()
    database.create()
    env = {**process_env, "DATABASE_URL": database.url, "JOBS_RECONCILE_INTERVAL_SECONDS": "1"}
    processes: list = []
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        token = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", MAKE_TOKEN],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]  # fmt: skip (the shell prints a line of its own first)
        worker, beat, web = WorkerProcess(env, tmp_path / "worker.log"), BeatProcess(env, tmp_path), Web(env, tmp_path)
        processes = [web, beat, worker]
        worker.start()
        beat.start()
        ids = []
        for i in range(12):
            status, body = web.request(
                "POST", "/api/jobs/", token, {"kind": "echo", "payload": {"message": str(i), "sleep_ms": 250 * i}}
            )
            assert status == 201, body
            ids.append(body["id"])
        wait_for(lambda: web.request("GET", f"/api/jobs/{ids[-1]}/", token)[1]["status"] == "running", timeout=30)

        database.stop()
        listed = web.request("GET", "/api/jobs/", token)
        submitted = web.request("POST", "/api/jobs/", token, {"kind": "echo", "payload": {"message": "x"}})
        health = web.request("GET", "/api/health/", "")
        # No event marks this: the outage must outlast a lease (the test settings' lease, the workers'
        # too), so that the running jobs' leases run out while the database is away and their workers
        # must stop them; what follows checks that every job still ends once it is back.
        time.sleep(settings.JOBS_LEASE_SECONDS)
        database.start()

        def final(job_id: str) -> dict | None:
            status, body = web.request("GET", f"/api/jobs/{job_id}/", token)
            return (
                body if status == 200 and body["status"] in ("succeeded", "failed", "timed_out", "cancelled") else None
            )

        jobs = [
            wait_for(lambda job_id=job_id: final(job_id), timeout=90, what=f"job {job_id} to end") for job_id in ids
        ]
    finally:
        for process in processes:
            process.stop()
        database.remove()

    assert listed[0] == submitted[0] == 503
    assert listed[1] == submitted[1] == {"detail": "The database is unavailable; try again shortly."}
    assert health[0] == 503
    assert health[1]["database"].startswith("error")
    assert [job["status"] for job in jobs] == ["succeeded"] * len(ids)
    assert all(job["attempts"] <= 2 for job in jobs)


MAKE_TOKEN = "from tests.factories import api_token, make_user; print(api_token(make_user('carol')))"
