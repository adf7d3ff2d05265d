"""Retention: what is old goes, with its files; what is recent, unfinished, a recent dead letter or
needed by an unfinished job stays."""

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from apps.jobs import retention
from apps.jobs.models import Artifact, Job, JobEvent, Upload
from tests.factories import make_job, make_upload, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def aged(job: Job, days: float) -> Job:
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(days=days))
    return job


def test_pruning_removes_only_what_is_old_with_its_files(settings) -> None:
    settings.JOBS_RETENTION_DAYS, settings.JOBS_RETENTION_DEAD_LETTER_DAYS = 30, 90
    settings.JOBS_RETENTION_BY_KIND = {"ai_generate": 7}
    settings.UPLOAD_RETENTION_DAYS, settings.JOBS_PRUNE_BATCH = 30, 2  # several batches
    settings.METRICS_TOKEN = "metrics-token"
    owner = make_user()
    old = [aged(make_job(owner, "succeeded"), 40) for _ in range(3)]
    built = aged(make_job(owner, "succeeded", kind="build"), 40)
    artifact = Artifact.objects.create(job=built, name="dist/app.whl", file=ContentFile(b"wheel", name="app.whl"),
                                       size=5, sha256="0" * 64)  # fmt: skip
    recent = aged(make_job(owner, "succeeded"), 1)
    ai_old_for_its_kind = aged(make_job(owner, "succeeded", kind="ai_generate"), 10)
    echo_as_old = aged(make_job(owner, "succeeded"), 10)
    dead_recent = aged(make_job(owner, "failed"), 40)  # a dead letter: kept 90 days
    dead_old = aged(make_job(owner, "failed"), 100)
    unfinished = make_job(owner, "running")
    Job.objects.filter(pk=unfinished.pk).update(created_at=timezone.now() - timedelta(days=400))
    stale_upload, needed_upload, replayable_upload = make_upload(owner), make_upload(owner), make_upload(owner)
    Upload.objects.filter(pk__in=[stale_upload.pk, needed_upload.pk, replayable_upload.pk]).update(
        created_at=timezone.now() - timedelta(days=40)
    )
    make_job(owner, "queued", kind="test", payload={"source": {"upload": str(needed_upload.pk)}})
    # a dead letter kept for its replay keeps the upload it reads
    dead_tool = aged(
        make_job(owner, "failed", kind="test", payload={"source": {"upload": str(replayable_upload.pk)}}), 40
    )

    counts = retention.prune(budget=60)

    gone = [*old, built, ai_old_for_its_kind, dead_old]
    kept = [recent, echo_as_old, dead_recent, unfinished, dead_tool]
    assert not Job.objects.filter(pk__in=[job.pk for job in gone]).exists()
    assert Job.objects.filter(pk__in=[job.pk for job in kept]).count() == len(kept)
    assert not JobEvent.objects.filter(job_id__in=[job.pk for job in gone]).exists()  # the timeline went too
    assert not default_storage.exists(artifact.file.name)  # the artifact's file with its row
    assert not Upload.objects.filter(pk=stale_upload.pk).exists()
    assert not default_storage.exists(stale_upload.file.name)
    assert Upload.objects.filter(pk=needed_upload.pk).exists()  # an unfinished job needs it
    assert Upload.objects.filter(pk=replayable_upload.pk).exists()
    assert counts == {"jobs": len(gone), "artifacts": 1, "uploads": 1, "files": 2}
    assert retention.prune(budget=60) == {}  # nothing left to prune

    scraped = APIClient().get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token").content.decode()
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(scraped) for s in f.samples}  # fmt: skip
    assert samples[("conveyor_pruned_total", ("jobs",))] >= len(gone)


def test_only_one_beat_prunes_at_a_time(settings) -> None:
    from apps.jobs import live

    live.client().set(retention.LOCK, "1", ex=60)  # another beat is pruning
    try:
        owner = make_user()
        job = aged(make_job(owner, "succeeded"), 400)
        assert retention.prune(budget=60) == {}
        assert Job.objects.filter(pk=job.pk).exists()

    finally:
        live.client().delete(retention.LOCK)


def test_a_run_out_of_time_stops_and_says_so(settings) -> None:
    settings.JOBS_PRUNE_BATCH = 1
    owner = make_user()
    jobs = [aged(make_job(owner, "succeeded"), 400) for _ in range(3)]
    assert retention.prune(budget=0) == {"unfinished_runs": 1}  # beat's tick is not held up
    assert Job.objects.filter(pk__in=[job.pk for job in jobs]).count() == 3
    assert retention.prune(budget=60)["jobs"] == 3
