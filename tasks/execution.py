"""Running one attempt of a job: claim it, run its kind's handler, record how it ended.

Plain functions, testable without Celery; `tasks.jobs.run_job` is the thin Celery entry point.
"""

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from billiard.process import current_process
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from apps.jobs import lifecycle
from apps.jobs.dispatch import publish_safely
from apps.jobs.errors import JobInterrupted, PermanentError, RetryableError
from apps.jobs.models import Job, Status
from tasks.handlers import HANDLERS
from tasks.sandbox.processes import pid_alive

log = logging.getLogger(__name__)

RETRYABLE = (RetryableError, ConnectionError, TimeoutError)


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_gone(runner: str) -> bool:
    """True when `runner` (host:pid) names a process of this host that no longer exists.

    Only a same-host check is possible; a runner on another host is judged by its heartbeat instead.
    """
    host, _, pid = runner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when it gave one."""
    if retry_after is not None:
        return max(0.0, retry_after)
    ceiling = min(
        settings.JOBS_RETRY_MAX_SECONDS,
        settings.JOBS_RETRY_BASE_SECONDS * 2 ** (attempt - 1),
    )
    return random.uniform(0, ceiling)


class Reporter:
    """`report(percent, message)` for handlers. Writes at most one progress update per interval;
    the latest value held back is written by the heartbeat, so nothing is lost, only coalesced."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._lock = threading.Lock()
        # The first write also waits an interval: a job shorter than that never pays for one.
        self._last_write = time.monotonic()
        self._pending: tuple[int, str] | None = None

    def __call__(self, percent: float, message: str = "") -> None:
        value = (max(0, min(100, int(percent))), message)
        with self._lock:
            if time.monotonic() - self._last_write < settings.JOBS_PROGRESS_MIN_INTERVAL_SECONDS:
                self._pending = value
                return
            self._pending = None
            self._last_write = time.monotonic()
        lifecycle.set_progress(self.job, *value)

    def take_pending(self) -> tuple[int, str] | None:
        """The value held back, which the caller writes itself (with the job's last transition)."""
        with self._lock:
            value, self._pending = self._pending, None
        return value

    def flush(self) -> None:
        value = self.take_pending()
        self._last_write = time.monotonic()
        if value:
            lifecycle.set_progress(self.job, *value)


@dataclass
class Watched:
    job: Job
    reporter: Reporter
    on_lost: Callable[[], None]
    last_beat: float = field(default_factory=time.monotonic)


class Heartbeat:
    """One thread per worker process that renews the lease of the job(s) it runs.

    A job that is no longer this process's when its lease is renewed (cancelled, or taken over
    after a long stall) is stopped through `on_lost`.
    """

    _instance: "Heartbeat | None" = None
    _pid = 0

    @classmethod
    def get(cls) -> "Heartbeat":
        if cls._instance is None or cls._pid != os.getpid():  # threads do not survive a fork
            cls._instance, cls._pid = cls(), os.getpid()
        return cls._instance

    def __init__(self) -> None:
        self._watched: dict[Any, Watched] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="conveyor-heartbeat", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, job: Job, reporter: Reporter, on_lost: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._watched[job.pk] = Watched(job, reporter, on_lost)
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(job.pk, None)

    def _loop(self) -> None:
        interval = settings.JOBS_HEARTBEAT_SECONDS
        while True:
            time.sleep(min(interval, settings.JOBS_PROGRESS_MIN_INTERVAL_SECONDS))
            with self._lock:
                watched = list(self._watched.values())
            if not watched:
                continue
            try:
                close_old_connections()
                for w in watched:
                    w.reporter.flush()
                    if time.monotonic() - w.last_beat < interval:
                        continue
                    w.last_beat = time.monotonic()
                    if not lifecycle.heartbeat(w.job) and w.job.pk in self._watched:
                        log.info(
                            "job %s is no longer ours (cancelled?); stopping it",
                            w.job.pk,
                        )
                        w.on_lost()
            except Exception:
                log.exception("heartbeat failed")
                connection.close()


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise JobInterrupted(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def interruptible() -> Iterator[Callable[[], None]]:
    """While the handler runs, SIGTERM (revoke with terminate, cold shutdown) raises JobInterrupted
    in it so that its cleanup runs (a build's process group is killed). Yields a function that
    interrupts the job from another thread.

    Only in a prefork pool process: in any other process SIGTERM belongs to the worker itself.
    """
    if threading.current_thread() is not threading.main_thread() or current_process().name == "MainProcess":
        yield lambda: None
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def take_over(job_id: str, *, task_id: str, worker: str, runner: str) -> Job | None:
    """A message for a running job whose process died here (the pool put the message back):
    settle the lost attempt, then claim the job again if it has attempts left."""
    job = Job.objects.filter(pk=job_id, status=Status.RUNNING).first()
    if job is None or not process_is_gone(job.runner):
        return None
    if lifecycle.recover_lost(job, "worker process lost") != Status.QUEUED:
        return None
    return lifecycle.claim(job.pk, task_id=task_id, worker=worker, runner=runner)


def run(job_id: str, *, task_id: str, worker: str) -> str | None:
    """Run one attempt of a job. Returns the status it ended in, or None if it was not ours to run."""
    close_old_connections()
    runner = runner_id()
    try:
        job = lifecycle.claim(job_id, task_id=task_id, worker=worker, runner=runner)
    except (InterfaceError, OperationalError):
        # The kept connection died (a database restart): claim again on a new one. The claim is a
        # single statement, so the failed one changed nothing.
        connection.close()
        job = lifecycle.claim(job_id, task_id=task_id, worker=worker, runner=runner)
    job = job or take_over(job_id, task_id=task_id, worker=worker, runner=runner)
    if job is None:
        log.info(
            "job %s not claimable (already claimed, finished, cancelled or not due)",
            job_id,
        )
        return None
    reporter = Reporter(job)
    try:
        with (
            interruptible() as interrupt,
            Heartbeat.get().watch(job, reporter, interrupt),
        ):
            result = HANDLERS[job.kind](job, reporter)
    except JobInterrupted as exc:
        return _interrupted(job, str(exc))
    except SoftTimeLimitExceeded:
        lifecycle.fail(
            job,
            "TimeoutError",
            f"timed out after {job.timeout_seconds}s",
            status=Status.TIMED_OUT,
        )
        return Status.TIMED_OUT
    except RETRYABLE as exc:
        return _retry_or_fail(job, exc)
    except PermanentError as exc:
        lifecycle.fail(job, type(exc).__name__, str(exc))
        return Status.FAILED
    except Exception as exc:
        log.exception("job %s (%s) raised", job.pk, job.kind)
        lifecycle.fail(job, type(exc).__name__, str(exc) or type(exc).__name__)
        return Status.FAILED
    pending = reporter.take_pending()
    lifecycle.succeed(job, result, progress_message=pending[1] if pending else None)
    return Status.SUCCEEDED


def _retry_or_fail(job: Job, exc: Exception) -> str:
    message = str(exc) or type(exc).__name__
    if job.attempts >= job.max_attempts:
        lifecycle.fail(
            job,
            type(exc).__name__,
            f"{message} (gave up after {job.attempts} attempts)",
        )
        return Status.FAILED
    delay = backoff(job.attempts, getattr(exc, "retry_after", None))
    if lifecycle.schedule_retry(job, type(exc).__name__, message, delay):
        publish_safely([job], countdown=delay)
    return Status.RETRYING


def _interrupted(job: Job, reason: str) -> str | None:
    if Job.objects.filter(pk=job.pk, status=Status.CANCELLED).exists():
        return Status.CANCELLED
    # Not cancelled: the worker is going away. The job was not at fault; run it again elsewhere.
    if lifecycle.requeue_interrupted(job, f"interrupted: {reason}"):
        job.refresh_from_db()
        publish_safely([job])
        return Status.QUEUED
    return None
