"""What operators read: /api/stats/ (staff) and /metrics (Prometheus), against the rows themselves."""

from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from apps.jobs import stats
from apps.jobs.models import ACTIVE_STATUSES, FINAL_STATUSES, Job
from tests.conftest import client_for, wait_for
from tests.factories import make_job, make_user, submit

pytestmark = pytest.mark.django_db(transaction=True)


def metrics(client: APIClient, **headers: str) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


@pytest.mark.usefixtures("no_shared_worker")  # the jobs stay in the states made for them
def test_stats_and_metrics_equal_the_rows(settings) -> None:
    settings.METRICS_TOKEN = "metrics-token"
    stats.rollup()  # counting starts here
    alice, bob = make_user(), make_user()
    for owner, status, kind in [
        (alice, "succeeded", "echo"), (alice, "succeeded", "echo"), (bob, "succeeded", "ai_generate"),
        (alice, "failed", "echo"), (bob, "timed_out", "echo"), (bob, "cancelled", "echo"),
        (alice, "running", "echo"), (alice, "retrying", "echo"), (bob, "scheduled", "echo"),
    ]:  # fmt: skip
        make_job(owner, status, kind=kind)
    assert stats.rollup(timezone.now() + timedelta(seconds=5)) == 6  # each finished job counted once
    assert stats.rollup(timezone.now() + timedelta(seconds=5)) == 0

    body = client_for(make_user(staff=True)).get("/api/stats/").json()
    jobs = list(Job.objects.all())
    finished = [job for job in jobs if job.status in FINAL_STATUSES]
    assert body["last_hour"]["finished_by_status"] == dict(Counter(job.status for job in finished))
    assert body["last_day"]["finished_by_kind"] == dict(Counter(job.kind for job in finished))
    assert body["unfinished"] == dict(Counter(job.status for job in jobs if job.status in ACTIVE_STATUSES))
    assert body["dead_letters"] == sum(job.dead_lettered for job in jobs) == 2
    assert sum(minute["finished"] for minute in body["throughput_per_minute"]) == 6
    assert set(body["timings_last_day"]) == {"echo", "ai_generate"}
    assert set(body["timings_last_day"]["echo"]) == {"queue_wait_seconds", "run_seconds"}

    scraped = metrics(APIClient(), HTTP_AUTHORIZATION="Bearer metrics-token")
    assert scraped[("conveyor_jobs_finished_total", (("kind", "echo"), ("status", "succeeded")))] == 2
    assert scraped[("conveyor_jobs", (("queue", "default"), ("status", "running")))] == 1
    assert scraped[("conveyor_dead_letters", ())] == 2
    assert scraped[("conveyor_job_run_seconds_count", (("kind", "echo"),))] == 4  # the cancelled one never ran
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in scraped.items()
        if name == "conveyor_job_run_seconds_bucket" and dict(labels)["kind"] == "echo"
    )
    assert len(buckets) == 22  # the same bounds for every kind and every scrape, and +Inf
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)  # cumulative
    assert buckets[-1] == (float("inf"), 4)


def test_metrics_and_stats_need_their_credentials(settings, api) -> None:
    settings.METRICS_TOKEN, settings.METRICS_BASIC_AUTH = "metrics-token", "prom:secret"
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": "Basic cHJvbTp3cm9uZw=="}):
        assert APIClient().get("/metrics", **headers).status_code == 401
    assert APIClient().get("/metrics", HTTP_AUTHORIZATION="Basic cHJvbTpzZWNyZXQ=").status_code == 200
    assert api.get("/metrics").status_code == 401  # a user's token is not an operator's
    staff = client_for(make_user(staff=True))
    assert staff.get("/metrics").status_code == 200
    assert api.get("/api/stats/").status_code == 403


@pytest.mark.usefixtures("no_shared_worker")  # nothing consumes: the jobs wait in the broker
def test_queue_depth_is_summed_over_every_priority_with_the_oldest_jobs_age(settings, api) -> None:
    settings.METRICS_TOKEN = "metrics-token"
    before = stats.queues()["default"]  # what earlier tests left unconsumed, if anything
    for priority in ("low", "normal", "high", "critical"):
        submit(api, "echo", {"message": priority}, priority=priority)
    queue = wait_for(lambda: (q := stats.queues()["default"])["depth"] == before["depth"] + 4 and q, what="4 more")

    added = {p: n - before["depth_by_priority"].get(p, 0) for p, n in queue["depth_by_priority"].items()}
    assert sorted(added.values()) == [1, 1, 1, 1]  # one list per priority
    assert queue["oldest_waiting_seconds"] > 0
    scraped = metrics(APIClient(), HTTP_AUTHORIZATION="Bearer metrics-token")
    assert scraped[("conveyor_queue_depth", (("queue", "default"),))] == before["depth"] + 4
    assert scraped[("conveyor_queue_oldest_waiting_seconds", (("queue", "default"),))] > 0


def test_stats_list_the_live_workers_and_what_they_consume(worker) -> None:
    body = client_for(make_user(staff=True)).get("/api/stats/").json()
    (live,) = [w for w in body["workers"] if w["name"].startswith("test-")]
    assert live["queues"] == ["ai", "builds", "default", "messages"]
    assert (live["pool"], live["concurrency"]) == ("prefork", 2)
