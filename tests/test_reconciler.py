"""The reconciler reads unfinished jobs only, through an index on status, so a table full of finished
jobs costs it nothing."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from apps.jobs import lifecycle
from apps.jobs.models import Job
from apps.jobs.reconciler import reconcile
from apps.jobs.services import build_job

pytestmark = pytest.mark.django_db


def plan(queryset: object) -> str:
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


NOW = timezone.now()
RECONCILER_QUERIES = {
    "due scheduled": {"status": Job.Status.SCHEDULED, "run_at__lte": NOW},
    "silent running": {"status": Job.Status.RUNNING, "heartbeat_at__lt": NOW},
    "overdue retrying": {"status": Job.Status.RETRYING, "run_at__lt": NOW},
    "unclaimed queued": {"status": Job.Status.QUEUED, "kind__in": ["echo"], "queued_at__lt": NOW},
}


@pytest.mark.parametrize("filters", RECONCILER_QUERIES.values(), ids=RECONCILER_QUERIES.keys())
def test_each_reconciler_query_reaches_only_jobs_of_its_status_through_an_index(filters: dict) -> None:
    query_plan = plan(Job.objects.filter(**filters))

    assert "Seq Scan" not in query_plan
    assert "Index Cond: ((status)::text = " in query_plan


def test_finished_jobs_are_left_alone_and_due_scheduled_ones_are_queued(user: User) -> None:
    old = timezone.now() - timedelta(days=1)
    done = lifecycle.create_jobs([build_job(user, {"kind": "echo", "payload": {"message": "d"}}) for _ in range(50)])
    Job.objects.filter(pk__in=[j.pk for j in done]).update(status=Job.Status.SUCCEEDED, heartbeat_at=old)
    due = lifecycle.create_jobs([build_job(user, {"kind": "echo", "payload": {"message": "s"}, "run_at": old})])[0]
    Job.objects.filter(pk=due.pk).update(status=Job.Status.SCHEDULED, queued_at=None)

    counts = reconcile()

    assert counts["promoted"] == 1
    assert counts["recovered"] == 0
    assert Job.objects.get(pk=due.pk).status == Job.Status.QUEUED
    assert Job.objects.filter(status=Job.Status.SUCCEEDED).count() == 50
