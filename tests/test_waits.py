"""`?wait=` on submitting and reading a job: the answer comes when the job ends, or when the wait is
over (202 with the job as it stands)."""

import time

import pytest

from apps.jobs.models import Job
from tests.conftest import Web
from tests.factories import api_token, submit

pytestmark = pytest.mark.django_db(transaction=True)


def test_submit_and_wait_answers_with_the_finished_job(api, worker) -> None:
    started = time.monotonic()
    response = api.post("/api/jobs/?wait=20", {"kind": "echo", "payload": {"message": "hi", "sleep_ms": 300}},
                        format="json")  # fmt: skip
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"message": "hi"}
    assert elapsed < 10


def test_a_wait_that_runs_out_answers_202_with_the_job_as_it_stands(api, worker) -> None:
    started = time.monotonic()
    response = api.post("/api/jobs/?wait=0.5", {"kind": "echo", "payload": {"message": "x", "sleep_ms": 5000}},
                        format="json")  # fmt: skip

    assert response.status_code == 202
    assert response.json()["status"] in ("queued", "running")
    assert "waiting_reason" in response.json()  # as a job's page shows it (None once it runs)
    assert 0.4 < time.monotonic() - started < 4


def test_reading_with_a_wait_answers_as_soon_as_the_job_ends(process_env, api, user, worker, tmp_path) -> None:
    # Through the web process as deployed (ASGI): the wait is on the job's live status events.
    web = Web(process_env, tmp_path)
    try:
        job = submit(api, "echo", {"message": "x", "sleep_ms": 1500})
        status, body = web.request("GET", f"/api/jobs/{job['id']}/?wait=8", api_token(user))
        answered = time.time()
    finally:
        web.stop()

    assert status == 200
    assert body["status"] == "succeeded"
    finished = Job.objects.get(pk=job["id"]).finished_at.timestamp()
    assert answered - finished < 1.0  # woken by the job's status event


def test_a_bad_wait_or_someone_elses_job_is_refused(api, other_api, worker) -> None:
    job = submit(api, "echo", {"message": "x"})
    assert api.get(f"/api/jobs/{job['id']}/?wait=soon").status_code == 400
    assert api.get(f"/api/jobs/{job['id']}/?wait=-1").status_code == 400
    assert other_api.get(f"/api/jobs/{job['id']}/?wait=5").status_code == 404
    assert api.post("/api/jobs/?wait=5", {"kind": "nope", "payload": {}}, format="json").status_code == 400
