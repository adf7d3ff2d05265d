"""Pruning what is old: finished jobs with their timeline, log, artifacts (and their files), and
uploads no unfinished job needs. Run by beat every JOBS_PRUNE_INTERVAL_SECONDS, by one beat at a time
(a Redis lock), in bounded batches: each batch is one short transaction under a statement timeout, so
no long lock is taken and a large backlog goes over several runs. Dead letters are kept longer (they
wait for a replay). The counts are logged and exported (`conveyor_pruned_total` on /metrics).

Ages (days; 0 keeps for ever): JOBS_RETENTION_DAYS for finished jobs, JOBS_RETENTION_BY_KIND to
override it per kind ("ai_generate=7,build=14"), JOBS_RETENTION_DEAD_LETTER_DAYS for dead letters,
UPLOAD_RETENTION_DAYS for uploads."""

import contextlib
import logging
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from apps.jobs import live
from apps.jobs.kinds import KINDS
from apps.jobs.models import FINAL_STATUSES, Artifact, Job, Status, Upload

log = logging.getLogger(__name__)

LOCK = "conveyor:prune:lock"
PRUNED_KEY = "conveyor:stats:pruned"
MAX_BATCHES = 50  # per run: the rest is the next run's
TOOL_KINDS = ("build", "test", "lint")


def _days_for(kind: str) -> int:
    return settings.JOBS_RETENTION_BY_KIND.get(kind, settings.JOBS_RETENTION_DAYS)


@contextlib.contextmanager
def _bounded() -> object:
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL statement_timeout = %s", [f"{settings.JOBS_PRUNE_STATEMENT_TIMEOUT_MS}ms"])
                cursor.execute("SET LOCAL lock_timeout = %s", ["2s"])
        yield


class _OutOfTime(Exception):
    pass


def prune(now: datetime | None = None, *, budget: float | None = None) -> dict[str, int]:
    """One run, if no other beat runs one: returns what was removed (jobs, artifacts, uploads, files).
    It stops after `budget` seconds (JOBS_PRUNE_MAX_SECONDS: beat's tick also starts scheduled jobs),
    leaving the rest to the next run; `done` in the counts is 0 then."""
    client = live.client()
    token = uuid.uuid4().hex
    if not client.set(LOCK, token, nx=True, ex=max(60, int(settings.JOBS_PRUNE_INTERVAL_SECONDS))):
        return {}
    deadline = time.monotonic() + (settings.JOBS_PRUNE_MAX_SECONDS if budget is None else budget)
    counts: Counter = Counter()
    try:
        _prune(counts, now or timezone.now(), deadline)
    except _OutOfTime:
        counts["unfinished_runs"] += 1
    finally:
        if client.get(LOCK) == token.encode():  # never another beat's lock
            client.delete(LOCK)
    if any(counts.values()):
        log.info("pruned: %s", dict(counts))
        with client.pipeline(transaction=False) as pipe:
            for what, n in counts.items():
                pipe.hincrby(PRUNED_KEY, what, n)
            pipe.execute()
    return dict(counts)


def _prune(counts: Counter, now: datetime, deadline: float) -> None:
    for kind in KINDS:
        days = _days_for(kind)
        if days:
            _prune_jobs(counts, kind, now - timedelta(days=days), deadline, dead_letters=False)
        dead_days = max(days, settings.JOBS_RETENTION_DEAD_LETTER_DAYS) if days else 0
        if dead_days:
            _prune_jobs(counts, kind, now - timedelta(days=dead_days), deadline, dead_letters=True)
    if settings.UPLOAD_RETENTION_DAYS:
        _prune_uploads(counts, now - timedelta(days=settings.UPLOAD_RETENTION_DAYS), deadline)


def _prune_jobs(counts: Counter, kind: str, before: datetime, deadline: float, *, dead_letters: bool) -> None:
    for _ in range(MAX_BATCHES):
        if time.monotonic() > deadline:
            raise _OutOfTime
        with _bounded():
            ids = list(
                Job.objects.filter(
                    kind=kind, status__in=FINAL_STATUSES, finished_at__lt=before, dead_lettered=dead_letters
                )
                .order_by("finished_at")
                .values_list("pk", flat=True)[: settings.JOBS_PRUNE_BATCH]
            )
            if not ids:
                return
            files = list(Artifact.objects.filter(job_id__in=ids).values_list("file", flat=True))
            counts["artifacts"] += len(files)
            # only("pk"): a job's payload and result (up to a megabyte each) are never loaded to go
            counts["jobs"] += Job.objects.filter(pk__in=ids).only("pk").delete()[1].get("jobs.Job", 0)
            transaction.on_commit(lambda files=files: _remove_files(counts, files))
        if len(ids) < settings.JOBS_PRUNE_BATCH:
            return


def _needed_uploads() -> set[str]:
    """Uploads a kept tool job may still read: unfinished ones, and finished ones but succeeded (a
    failed, timed-out or cancelled job may be replayed, dead letters for JOBS_RETENTION_DEAD_LETTER_DAYS)."""
    return {
        source["upload"]
        for source in Job.objects.filter(kind__in=TOOL_KINDS)
        .exclude(status=Status.SUCCEEDED)
        .values_list("payload__source", flat=True)
        if isinstance(source, dict) and source.get("upload")
    }


def _prune_uploads(counts: Counter, before: datetime, deadline: float) -> None:
    for _ in range(MAX_BATCHES):
        if time.monotonic() > deadline:
            raise _OutOfTime
        with _bounded():
            needed = _needed_uploads()  # looked at again in each batch's transaction
            old = list(
                Upload.objects.filter(created_at__lt=before)
                .exclude(pk__in=needed)
                .order_by("created_at")
                .values_list("pk", "file")[: settings.JOBS_PRUNE_BATCH]
            )
            if not old:
                return
            counts["uploads"] += Upload.objects.filter(pk__in=[pk for pk, _ in old]).delete()[0]
            files = [name for _, name in old]
            transaction.on_commit(lambda files=files: _remove_files(counts, files))
        if len(old) < settings.JOBS_PRUNE_BATCH:
            return


def _remove_files(counts: Counter, names: list[str]) -> None:
    """Files go with their rows, once the rows are gone (a file without a row is never served)."""
    from django.core.files.storage import default_storage

    for name in names:
        if name:
            with contextlib.suppress(FileNotFoundError, OSError):
                default_storage.delete(name)
                counts["files"] += 1
