"""Running one attempt of a job: claim it, run its kind's handler, record how it ended.

Plain functions, testable without Celery; `tasks.entrypoints.run_job` is the thin Celery entry point.
The kind's handler gets the attempt's context (`tasks.context.Context`) and returns its result.

The attempt's deadline belongs to the platform: it is counted from the claim, on this process's
monotonic clock, and whatever a handler, a provider SDK or a tool does with Celery's soft time limit
(some turn it into a connection error), an attempt that ends past its deadline is `timed_out`.
The attempt's lease is renewed by a heartbeat thread (`tasks.leases`); when it cannot be renewed (the
database is unreachable, the job was taken over or cancelled), the handler is stopped before the
lease runs out.
"""

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from billiard.process import current_process
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection

from apps.jobs import lifecycle, live, sql
from apps.jobs.models import Job, Status
from apps.jobs.statuses import ErrorType
from tasks import connections, interrupts
from tasks.context import Context, JobInterrupted, PermanentError, RetryableError
from tasks.kinds import HANDLERS
from tasks.leases import Heartbeat, Reporter, Watched
from tasks.sandbox.processes import pid_alive

log = logging.getLogger(__name__)

# A passing failure of a handler: its own, the network's, or the database's (unreachable, a pooled
# connection not given in time).
RETRYABLE = (RetryableError, ConnectionError, TimeoutError, OperationalError, InterfaceError)
# An attempt's final write is tried this many times (with a pause that doubles from WRITE_PAUSE)
# while the database is unreachable, before the message is handed back to the broker.
WRITE_TRIES = 5
WRITE_PAUSE = 0.5
# Celery's soft time limit is armed a moment before the claim that starts our own clock: an attempt
# that ends this close to its deadline has met Celery's limit (some SDKs hide it behind another error).
DEADLINE_TOLERANCE = 0.5
T = TypeVar("T")


@cache
def _namespace() -> str:
    """This machine's boot and this process's PID namespace: two containers that share a hostname
    (or a pid) are never taken for one another."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "-"
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = 0
    return f"{boot}:{pid_ns}"


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}@{_namespace()}"


def process_is_gone(process: str) -> bool:
    """True when `process` names a process of this machine and PID namespace that no longer exists.
    A process anywhere else is judged by its lease (the heartbeat) instead."""
    where, _, namespace = process.partition("@")
    host, _, pid = where.rpartition(":")
    if host != socket.gethostname() or namespace != _namespace() or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


def record_claim_order(job: Job) -> None:
    """Tell the reconciler how far the workers have come in the job's queue and priority (the latest
    publish time claimed), so that it can tell a lost message from one still waiting its turn."""
    published = max(filter(None, (job.queued_at, job.redispatched_at)), default=None)
    if published is not None:  # (a retry's claim names an older time: the record keeps the latest)
        live.record_claimed(job.queue, job.priority, published.timestamp())


_interrupt_reason = ""


def _raise_interrupted(signum: int, frame: Any) -> None:
    interrupts.interrupt(_interrupt_reason or f"stopped by signal {signal.Signals(signum).name}")


def signals_reach_the_job() -> bool:
    """True in a prefork pool process running the job in its main thread: SIGTERM and Celery's time
    limits reach the job. Elsewhere (threads, solo) the heartbeat enforces the deadline, and a cancel
    arrives through the worker's `conveyor_cancel` command."""
    return threading.current_thread() is threading.main_thread() and current_process().name != "MainProcess"


@contextmanager
def interruptible() -> Iterator[Callable[[str], None]]:
    """While the handler runs, SIGTERM (revoke with terminate, a worker's cold shutdown, the hard time
    limit) raises JobInterrupted in it so that its cleanup runs (a build's processes are killed).
    Yields a function that interrupts the job from another thread, saying why.

    Only in a prefork pool process: in any other process SIGTERM belongs to the worker itself.
    """
    if not signals_reach_the_job():
        attempt = interrupts.current()
        yield attempt.interrupt if attempt else lambda reason: None
        return

    def interrupt(reason: str) -> None:
        global _interrupt_reason
        _interrupt_reason = reason
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
        globals()["_interrupt_reason"] = ""


def _with_database(write: Callable[[], T]) -> T:
    """Run a write of the attempt, again on a new connection while the database is unreachable (a
    bounded number of times); if it stays unreachable, the message goes back to the broker unacked
    (the job's lease runs out meanwhile and the reconciler settles the attempt)."""
    pause = WRITE_PAUSE
    for tries_left in range(WRITE_TRIES - 1, -1, -1):
        try:
            return write()
        except (InterfaceError, OperationalError) as exc:
            connection.close()
            if not tries_left:
                log.error("database unreachable; the message goes back to the broker: %s", exc)
                time.sleep(pause)  # not at once: the next delivery would meet the same outage
                raise Reject(f"database unreachable: {exc}", requeue=True) from None
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def take_over(job_id: str, *, task_id: str, worker: str, process: str) -> Job | None:
    """A message for a running job whose attempt is over without having said so: its process died
    here (the pool put the message back), or its lease ran out. Settle that attempt, then claim the
    job again if it has attempts left."""
    job = Job.objects.filter(pk=job_id, status=Status.RUNNING).first()
    if job is None:
        return None
    now = sql.db_now()
    expired = job.heartbeat_at is not None and (now - job.heartbeat_at).total_seconds() > settings.JOBS_LEASE_SECONDS
    if not (process_is_gone(job.process) or expired):
        return None
    reason = "worker process lost" if not expired else "worker lost (its lease ran out)"
    if lifecycle.recover_lost(job, reason, now, publish=False) != Status.QUEUED:
        return None
    return lifecycle.claim(job.pk, task_id=task_id, worker=worker, process=process)


def _claim(job_id: str, *, task_id: str, worker: str, process: str) -> Job | None:
    try:
        return lifecycle.claim(job_id, task_id=task_id, worker=worker, process=process) or take_over(
            job_id, task_id=task_id, worker=worker, process=process
        )
    except (InterfaceError, OperationalError):
        # The kept connection died (a database restart): claim again on a new one. The claim is a
        # single statement, so the failed one changed nothing.
        connection.close()
    return _with_database(
        lambda: (
            lifecycle.claim(job_id, task_id=task_id, worker=worker, process=process)
            or take_over(job_id, task_id=task_id, worker=worker, process=process)
        )
    )


def run(job_id: str, *, task_id: str, worker: str) -> str | None:
    """Run one attempt of a job. Returns the status it ended in, or None if it was not ours to run."""
    try:
        return _run(job_id, task_id=task_id, worker=worker)
    finally:
        connections.release()  # pooled: back to the pool for the next thread (Celery keeps it otherwise)


def _run(job_id: str, *, task_id: str, worker: str) -> str | None:
    close_old_connections()
    job = _claim(job_id, task_id=task_id, worker=worker, process=process_id())
    if job is None:
        log.info("job %s not claimable (already claimed, finished, cancelled or not due)", job_id)
        return None
    claimed_at = time.monotonic()
    deadline = claimed_at + job.timeout_seconds - min(DEADLINE_TOLERANCE, job.timeout_seconds / 4)
    record_claim_order(job)
    reporter = Reporter(job)
    watched: Watched | None = None
    in_place = not signals_reach_the_job()
    attempt = interrupts.Attempt(deadline, in_place=in_place)
    # Without Celery's time limits (threads, solo), the heartbeat stops the attempt at its timeout.
    enforced = claimed_at + job.timeout_seconds if in_place else None
    connections.release()  # pooled (a threads pool): not held while the handler runs
    ctx = Context(job, reporter, deadline, lambda: attempt.reason)
    try:
        with (
            interrupts.running(attempt),
            interruptible() as interrupt,
            Heartbeat.get().watch(job, reporter, interrupt, enforced) as watched,
        ):
            try:
                result = HANDLERS[job.kind](ctx)
            finally:
                ctx.close()
            interrupts.check()  # interrupted from another thread, though the handler finished
    except JobInterrupted as exc:
        reason = str(exc)
        return _with_database(lambda: _interrupted(job, reason, watched, deadline))
    except SoftTimeLimitExceeded:
        return _with_database(lambda: lifecycle.end_attempt(job, "", "", retryable=False, timed_out=True))
    except Exception as exc:
        if attempt.reason:  # the interruption made the handler fail (its stream was closed)
            reason = attempt.reason
            return _with_database(lambda: _interrupted(job, reason, watched, deadline))
        error = exc
        return _with_database(lambda: _failed(job, error, deadline))
    pending = reporter.take_pending()
    return _with_database(lambda: _succeeded(job, result, pending[1] if pending else None))


def _succeeded(job: Job, result: Any, progress_message: str | None) -> str | None:
    try:
        won = lifecycle.succeed(job, result, progress_message=progress_message)
    except (InterfaceError, OperationalError):
        raise  # unreachable: tried again by the caller
    except DatabaseError as exc:
        # A value the database refuses even after cleaning: the job fails, saying so, instead of
        # staying `running` until its lease runs out.
        connection.close()
        log.exception("job %s: its result could not be stored", job.pk)
        message = f"the result could not be stored: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        return lifecycle.end_attempt(job, ErrorType.UNSTORABLE_RESULT, message, retryable=False)
    return Status.SUCCEEDED if won else None


def _failed(job: Job, exc: Exception, deadline: float) -> str | None:
    if time.monotonic() >= deadline:
        # Past the deadline, whatever the handler made of the soft time limit (an SDK may turn it
        # into a connection error): the attempt timed out.
        return lifecycle.end_attempt(job, "", "", retryable=False, timed_out=True)
    if not isinstance(exc, (*RETRYABLE, PermanentError)):
        log.exception("job %s (%s) raised", job.pk, job.kind)
    return lifecycle.end_attempt(
        job,
        type(exc).__name__,
        str(exc) or type(exc).__name__,
        retryable=isinstance(exc, RETRYABLE),
        retry_after=getattr(exc, "retry_after", None),
        counted=getattr(exc, "counted", True),
    )


def _interrupted(job: Job, reason: str, watched: Watched | None, deadline: float) -> str | None:
    current = Job.objects.filter(pk=job.pk).values_list("status", "lease").first()
    if current is None:
        return None
    status, lease = current
    if status == Status.CANCELLED:
        return Status.CANCELLED
    if status != Status.RUNNING or lease != job.lease:
        return None  # no longer this attempt's to settle
    if time.monotonic() >= deadline:  # Celery's hard time limit arrives as SIGTERM too
        return lifecycle.end_attempt(job, "", "", retryable=False, timed_out=True)
    if watched and watched.lost:
        return None  # its lease could not be renewed: the reconciler settles it once the lease runs out
    # Not cancelled, not late: the worker is going away. The job was not at fault; it goes back.
    return lifecycle.hand_back(job, f"interrupted: {reason}")
