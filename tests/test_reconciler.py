"""The reconciler reads unfinished jobs only, through an index on status, so a table full of finished
jobs costs it nothing."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from apps.jobs.models import Job
from apps.jobs.reconciler import reconcile
from tests.factories import make_job

pytestmark = pytest.mark.django_db


def plan(queryset: object) -> str:
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


NOW = timezone.now()
# The reconciler's own querysets, not copies of their filters.
RECONCILER_QUERIES = {
    "due scheduled": lambda: Job.objects.due_scheduled(NOW),
    "silent running": lambda: Job.objects.silent_running(NOW),
    "stuck retrying": lambda: Job.objects.stuck_retrying(NOW),
    "lost queued": lambda: Job.objects.unclaimed("default").filter(priority="normal").published_before(NOW),
}


@pytest.mark.parametrize("queryset", RECONCILER_QUERIES.values(), ids=RECONCILER_QUERIES.keys())
def test_each_reconciler_query_reaches_only_jobs_of_its_status_through_an_index(queryset: object) -> None:
    query_plan = plan(queryset())

    assert "Seq Scan" not in query_plan
    assert "Index Cond:" in query_plan
    assert "status" in query_plan


def test_finished_jobs_are_left_alone_and_due_scheduled_ones_are_queued(user: User) -> None:
    old = timezone.now() - timedelta(days=1)
    done = [make_job(user, Job.Status.SUCCEEDED) for _ in range(50)]
    # A silent heartbeat on each, which only the status tells apart from a lost worker's.
    Job.objects.filter(pk__in=[j.pk for j in done]).update(heartbeat_at=old)
    due = make_job(user, Job.Status.SCHEDULED)
    Job.objects.filter(pk=due.pk).update(run_at=old)  # its time came a day ago

    counts = reconcile()

    assert counts["promoted"] == 1
    assert counts["recovered"] == 0
    assert Job.objects.get(pk=due.pk).status == Job.Status.QUEUED
    assert Job.objects.filter(status=Job.Status.SUCCEEDED).count() == 50
