"""Who may jump the queue, and why a job waits."""

import pytest
from django.contrib.auth.models import Permission

from apps.jobs import workers
from tests.conftest import client_for
from tests.factories import make_job, make_user, submit

pytestmark = pytest.mark.django_db(transaction=True)


def test_with_restricted_priority_high_and_critical_need_the_permission(settings, api, user) -> None:
    settings.JOBS_RESTRICT_PRIORITY = True
    for priority in ("high", "critical"):
        refused = submit(api, "echo", {"message": "x"}, priority=priority, expect=403)
        assert "jobs.submit_critical" in refused["detail"]
        batch = api.post("/api/jobs/batch/", {"jobs": [{"kind": "echo", "payload": {"message": "x"},
                                                         "priority": priority}]}, format="json")  # fmt: skip
        assert batch.status_code == 403
    assert submit(api, "echo", {"message": "x"}, priority="normal")["priority"] == "normal"

    trusted = make_user()
    trusted.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    assert submit(client_for(trusted), "echo", {"message": "x"}, priority="critical")["priority"] == "critical"
    settings.JOBS_RESTRICT_PRIORITY = False
    assert submit(api, "echo", {"message": "x"}, priority="critical")["priority"] == "critical"  # off: as before


@pytest.mark.usefixtures("no_shared_worker")  # nothing takes the jobs: they stay where they wait
def test_a_waiting_job_says_why(api, user) -> None:
    scheduled = make_job(user, "scheduled")
    assert api.get(f"/api/jobs/{scheduled.pk}/").json()["waiting_reason"].startswith("scheduled for ")

    first = submit(api, "echo", {"message": "1"})
    assert api.get(f"/api/jobs/{first['id']}/").json()["waiting_reason"] == "no worker consumes queue default"

    workers.announce("listening@test", {"queues": ["default"]})  # a worker that consumes it (busy)
    try:
        second = submit(api, "echo", {"message": "2"})
        urgent = submit(api, "echo", {"message": "3"}, priority="critical")
        reasons = {job["id"]: api.get(f"/api/jobs/{job['id']}/").json()["waiting_reason"]
                   for job in (first, second, urgent)}  # fmt: skip
    finally:
        workers.withdraw("listening@test")
    assert reasons[urgent["id"]] == "next in queue default"  # critical goes first
    assert reasons[first["id"]] == "behind 1 job(s) in queue default"
    assert reasons[second["id"]] == "behind 2 job(s) in queue default"
    finished = make_job(user, "succeeded")
    assert api.get(f"/api/jobs/{finished.pk}/").json()["waiting_reason"] is None
