"""The Django admin's job pages, as a staff member uses them."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apps.jobs import lifecycle
from apps.jobs.models import Job, LogChunk
from tests.factories import make_job, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client: Client) -> Client:
    client.force_login(make_user("root", superuser=True))
    return client


def test_the_job_list_shows_progress_and_filters(admin_client: Client, user: User) -> None:
    job = make_job(user)
    # What a queued job shows after an attempt got that far and was handed back; only the page is tested.
    Job.objects.filter(pk=job.pk).update(progress=40, progress_message="running")

    page = admin_client.get("/admin/jobs/job/", {"status__exact": "queued", "priority__exact": "normal"})

    assert page.status_code == 200
    html = page.content.decode()
    assert str(job.pk) in html
    assert '<progress value="40" max="100"' in html
    for name in ("status", "kind", "priority", "dead_lettered", "owner"):
        assert f"By {name.replace('_', ' ')}" in html


def test_search_finds_a_job_by_its_id(admin_client: Client, user: User) -> None:
    wanted, other = make_job(user), make_job(user)

    html = admin_client.get("/admin/jobs/job/", {"q": str(wanted.pk)}).content.decode()

    assert str(wanted.pk) in html
    assert str(other.pk) not in html
    assert admin_client.get("/admin/jobs/job/", {"q": "not-a-uuid"}).status_code == 200


def test_the_job_page_shows_its_timeline(admin_client: Client, user: User) -> None:
    job = make_job(user, Job.Status.CANCELLED)

    html = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()

    assert "Job events" in html
    assert "cancelled" in html


def test_the_cancel_and_replay_actions_change_jobs(admin_client: Client, user: User) -> None:
    queued, finished = make_job(user), make_job(user, Job.Status.FAILED)

    admin_client.post("/admin/jobs/job/", {"action": "cancel_jobs", "_selected_action": [queued.pk, finished.pk]})
    admin_client.post("/admin/jobs/job/", {"action": "replay_dead_letters", "_selected_action": [finished.pk]})

    assert Job.objects.get(pk=queued.pk).status == Job.Status.CANCELLED
    replayed = Job.objects.get(pk=finished.pk)
    assert (replayed.status, replayed.dead_lettered) == (Job.Status.QUEUED, False)
    assert list(replayed.events.values_list("type", flat=True)) == ["queued", "running", "failed", "retried"]

    admin_client.post("/admin/jobs/job/", {"action": "replay_jobs", "_selected_action": [queued.pk]})
    assert Job.objects.get(pk=queued.pk).status == Job.Status.QUEUED


def test_the_job_page_shows_the_log_tail_and_the_structured_result(admin_client: Client, user: User) -> None:
    job = make_job(user, Job.Status.RUNNING, kind="test")
    url = f"/api/jobs/{job.pk}/artifacts/dist/a.whl"
    result = {
        "outcome": "failed", "exit_code": 1, "tests": 3, "passed": 1, "failed": 1, "errors": 1, "skipped": 0,
        "duration_s": 0.5, "failures": [{"test": "tests/test_a.py::test_x", "message": "assert <1> == 2"}],
        "artifacts": [{"name": "dist/a.whl", "size": 10, "sha256": "ab" * 32, "url": url}],
    }  # fmt: skip
    lifecycle.succeed(job, result)
    LogChunk.objects.create(job=job, offset=0, text="collecting ...\n<script>alert(1)</script>\n")

    html = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()

    assert "3 tests, 1 passed, 1 failed, 1 errors, 0 skipped" in html
    assert "<td>tests/test_a.py::test_x</td><td>assert &lt;1&gt; == 2</td>" in html
    assert f'<a href="/api/jobs/{job.pk}/artifacts/dist/a.whl">dist/a.whl</a>' in html
    assert "collecting ..." in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html


def test_the_job_page_shows_lint_diagnostics(admin_client: Client, user: User) -> None:
    diagnostic = {"path": "a.py", "line": 1, "column": 8, "code": "F401", "message": "`os` imported but unused"}
    result = {"outcome": "issues", "exit_code": 1, "count": 1, "diagnostics": [diagnostic], "by_code": {"F401": 1}}
    job = make_job(user, Job.Status.SUCCEEDED, kind="lint", result=result)

    html = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()

    assert "issues</b>: 1 diagnostics" in html
    assert "<td>a.py</td><td>1</td><td>8</td><td>F401</td>" in html
