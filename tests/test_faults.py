"""The core's promises through faults, with the product's own processes (worker, beat): a lost message
on a busy queue, every worker slot busy, broker blips and restarts, a worker shutting down."""

import os
import signal
import statistics
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from apps.jobs import lifecycle, services
from apps.jobs.models import Job
from apps.jobs.reconciler import CLAIM_ORDER_SLACK_SECONDS
from tests.conftest import BeatProcess, PrivateRedis, WorkerProcess, publishing_to, wait_final, wait_for
from tests.factories import make_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.broker]


def connections_made(worker: WorkerProcess) -> int:
    """How many times the worker has connected to the broker (its consumer says so in its log)."""
    scheme = settings.CELERY_BROKER_URL.split("://")[0]
    return worker.log_path.read_text(errors="replace").count(f"Connected to {scheme}://")


def submitted(user: User, sleep_ms: int = 0, **fields: object) -> Job:
    """An echo job submitted as the API does (a worker may take it at once: no status is checked)."""
    return services.submit_job(user, {"kind": "echo", "payload": {"message": "m", "sleep_ms": sleep_ms}, **fields})[0]


def ended(jobs: list[Job]) -> int:
    return Job.objects.filter(pk__in=[job.pk for job in jobs], status=Job.Status.SUCCEEDED).count()


def running_events(job: Job) -> int:
    return job.events.filter(type="running").count()


def message_of(client: redis.Redis, queue: str, job: Job) -> tuple[str, bytes] | None:
    for name in (queue, *(f"{queue}:{step}" for step in (3, 6, 9))):
        for message in client.lrange(name, 0, -1):
            if str(job.pk).encode() in message:
                return name, message
    return None


class Feeder(threading.Thread):
    """Keeps a queue busy with short jobs, below the workers' capacity."""

    def __init__(self, user: User, every: float, sleep_ms: int) -> None:
        super().__init__(daemon=True)
        self.user, self.every, self.sleep_ms = user, every, sleep_ms
        self.jobs: list[Job] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.jobs.append(submitted(self.user, sleep_ms=self.sleep_ms))
                self.stop.wait(self.every)
        finally:
            connection.close()


def test_a_lost_message_on_a_busy_queue_is_found_and_only_it_is_published_again(
    worker: WorkerProcess, beat: BeatProcess, user: User
) -> None:
    feeder = Feeder(user, every=0.05, sleep_ms=30)  # ~20 jobs/s against ~2 workers x 30 ms
    for _ in range(12):  # a backlog, so that the job's message is still waiting when it is removed
        submitted(user, sleep_ms=100)
    feeder.start()
    try:
        if settings.BROKER_IS_REDIS:
            client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
            lost = submitted(user, sleep_ms=50)
            where = message_of(client, "default", lost)
            assert where is not None, "the message was taken before it could be removed"
            assert client.lrem(where[0], 1, where[1]) == 1
        else:  # RabbitMQ hands a message to one consumer at a time: lost on its way there instead
            with mock.patch("apps.jobs.lifecycle.publish_on_commit"):
                lost = submitted(user, sleep_ms=50)
        removed_at = time.monotonic()

        job = wait_final(lost.pk, timeout=30)
        took = time.monotonic() - removed_at
    finally:
        feeder.stop.set()
        feeder.join()

    assert job.status == Job.Status.SUCCEEDED
    assert job.attempts == 1
    assert job.redispatched_at is not None
    # Found once the claims passed it and it waited the grace, at the next reconcile; then taken first.
    bound = settings.JOBS_REDISPATCH_GRACE_SECONDS + CLAIM_ORDER_SLACK_SECONDS + 1 + 0.05 + 1.0
    timeline = [(e.type, round((e.at - job.queued_at).total_seconds(), 2)) for e in job.events.all()]
    redispatched = round((job.redispatched_at - job.queued_at).total_seconds(), 2)
    assert took < bound, f"took {took:.1f}s (bound {bound:.1f}s): redispatched at {redispatched}s, {timeline}"
    others = [wait_final(fed.pk) for fed in feeder.jobs]
    assert len(others) >= 10  # the queue was busy all along
    assert all(other.status == Job.Status.SUCCEEDED for other in others)
    assert [other.pk for other in others if other.redispatched_at is not None] == []


def test_run_at_is_kept_within_a_second_while_every_worker_slot_is_busy(
    worker: WorkerProcess, beat: BeatProcess, user: User
) -> None:
    blockers = [submitted(user, sleep_ms=60_000) for _ in range(2)]
    wait_for(lambda: Job.objects.filter(pk__in=[b.pk for b in blockers], status="running").count() == 2)
    start = timezone.now() + timedelta(seconds=2)
    scheduled = [
        make_job(user, Job.Status.SCHEDULED, run_at=start + timedelta(milliseconds=150 * i)) for i in range(20)
    ]
    try:
        wait_for(
            lambda: not Job.objects.filter(pk__in=[j.pk for j in scheduled], status="scheduled").exists(),
            timeout=15,
            what="every scheduled job to be queued",
        )
    finally:
        for job in blockers + scheduled:
            lifecycle.cancel(job.pk)

    late = sorted(
        (j.events.get(type="queued", message="scheduled time reached").at - j.run_at).total_seconds()
        for j in Job.objects.filter(pk__in=[j.pk for j in scheduled])
    )
    assert all(delay >= 0 for delay in late)
    p95 = late[int(0.95 * len(late)) - 1]
    assert p95 < 1.0, f"p95 {p95:.3f}s, median {statistics.median(late):.3f}s"


def cut_broker_connections() -> None:
    """Every client connection to the broker closed by the server (this session's vhost, on RabbitMQ)."""
    if settings.BROKER_IS_REDIS:
        assert redis.Redis.from_url(settings.CELERY_BROKER_URL).client_kill_filter(_type="normal", skipme=True) >= 1
        return
    vhost = settings.CELERY_BROKER_URL.rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "a test's blip"], check=True, timeout=60)


def test_a_broker_blip_does_not_restart_a_running_job(worker: WorkerProcess, user: User) -> None:
    job = submitted(user, sleep_ms=6000)
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "running")

    for _ in range(2):
        connected = connections_made(worker)
        cut_broker_connections()
        wait_for(lambda n=connected: connections_made(worker) > n, what="the worker to connect to the broker again")
    done = wait_final(job.pk, timeout=30)

    assert done.status == Job.Status.SUCCEEDED
    assert done.attempts == 1
    assert list(done.events.values_list("type", flat=True)) == ["queued", "running", "succeeded"]
    after = submitted(user)  # the worker consumes again
    assert wait_final(after.pk).status == Job.Status.SUCCEEDED


# --- a broker that restarts -----------------------------------------------------------------------


@pytest.mark.skipif(
    not settings.BROKER_IS_REDIS, reason="restarts a private Redis; the machine's RabbitMQ is shared, not restarted"
)
@pytest.mark.usefixtures("no_shared_worker")
def test_jobs_run_once_each_while_the_broker_restarts(process_env: dict, user: User, tmp_path: Path) -> None:
    broker = PrivateRedis(tmp_path)
    broker.start()
    env = {**process_env, "REDIS_URL": broker.url, "JOBS_RECONCILE_INTERVAL_SECONDS": "1"}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    beat = BeatProcess(env, tmp_path)
    with publishing_to(broker.url):
        worker.start()
        beat.start()
        try:
            jobs = [submitted(user, sleep_ms=20 + (i % 5) * 20) for i in range(500)]
            for _ in range(3):
                # Each restart while the jobs run, once the worker has got on with them since the last
                # (the messages a restart loses run once the reconciler has published them again).
                enough = ended(jobs) + 20
                wait_for(lambda enough=enough: ended(jobs) >= enough, timeout=30, what="20 more jobs to end")
                broker.restart()
            done = [wait_final(job.pk, timeout=120) for job in jobs]
        finally:
            beat.stop()
            worker.stop()
            broker.stop()

    assert {job.status for job in done} == {Job.Status.SUCCEEDED}
    assert [job.pk for job in done if job.attempts != 1] == []
    assert [job.pk for job in done if running_events(job) != 1] == []


@pytest.mark.usefixtures("no_shared_worker")
def test_a_worker_shutting_down_hands_its_running_job_back_without_burning_an_attempt(
    process_env: dict, user: User, tmp_path: Path, shared_worker: WorkerProcess
) -> None:
    env = {**process_env, "REMAP_SIGTERM": "SIGQUIT", "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "1"}
    leaving = WorkerProcess(env, tmp_path / "leaving.log")
    leaving.start()
    job = submitted(user, sleep_ms=8000, max_attempts=1)
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "running")

    os.killpg(leaving.proc.pid, signal.SIGTERM)  # a deploy: the soft shutdown, then the cold one
    handed = wait_for(lambda: (j := Job.objects.get(pk=job.pk)).status == "queued" and j, timeout=20)
    leaving.proc.wait(20)
    shared_worker.ensure_running()
    done = wait_final(job.pk, timeout=30)

    assert (handed.attempts, handed.handbacks) == (0, 1)
    assert done.status == Job.Status.SUCCEEDED
    assert (done.attempts, done.handbacks) == (1, 1)
    assert list(done.events.values_list("type", flat=True)) == [
        "queued",
        "running",
        "handed_back",
        "running",
        "succeeded",
    ]
