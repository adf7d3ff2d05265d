"""The Django admin's job pages, as a staff member uses them."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apps.jobs import lifecycle
from apps.jobs.models import Job
from apps.jobs.services import build_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("root", "root@x.test", "pw"))
    return client


def make_job(owner: User, **fields: object) -> Job:
    job = build_job(owner, {"kind": "echo", "payload": {"message": "m"}, **fields})
    return lifecycle.create_jobs([job])[0]


def test_the_job_list_shows_progress_and_filters(admin_client: Client, user: User) -> None:
    job = make_job(user)
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
    job = make_job(user)
    lifecycle.cancel(job.pk)

    html = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()

    assert "Job events" in html
    assert "cancelled" in html


def test_the_cancel_and_replay_actions_change_jobs(admin_client: Client, user: User) -> None:
    queued, finished = make_job(user), make_job(user)
    Job.objects.filter(pk=finished.pk).update(status=Job.Status.FAILED, dead_lettered=True)

    admin_client.post("/admin/jobs/job/", {"action": "cancel_jobs", "_selected_action": [queued.pk, finished.pk]})
    admin_client.post("/admin/jobs/job/", {"action": "replay_dead_letters", "_selected_action": [finished.pk]})

    assert Job.objects.get(pk=queued.pk).status == Job.Status.CANCELLED
    replayed = Job.objects.get(pk=finished.pk)
    assert (replayed.status, replayed.dead_lettered) == (Job.Status.QUEUED, False)
    assert list(replayed.events.values_list("type", flat=True)) == ["queued", "retried"]

    admin_client.post("/admin/jobs/job/", {"action": "retry_jobs", "_selected_action": [queued.pk]})
    assert Job.objects.get(pk=queued.pk).status == Job.Status.QUEUED
