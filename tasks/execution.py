"""Running one attempt of a job: claim it, run its kind's handler, record how it ended.

Plain functions, testable without Celery; `tasks.entrypoints.run_job` is the thin Celery entry point.
The kind's handler gets the attempt's context (`tasks.context.Context`) and returns its result.

The attempt's deadline belongs to the platform: it is counted from the claim, on this process's
monotonic clock, and whatever a handler, a provider SDK or a tool does with Celery's soft time limit
(some turn it into a connection error), an attempt that ends past its deadline is `timed_out`.
The attempt's lease is renewed by a heartbeat thread; when it cannot be renewed (the database is
unreachable, the job was taken over or cancelled), the handler is stopped before the lease runs out.
"""

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from billiard.process import current_process
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection, transaction

from apps.jobs import lifecycle, live, sql
from apps.jobs.models import Job, Status
from apps.jobs.statuses import ErrorType
from project.processes import per_process
from tasks import connections, interrupts
from tasks.context import Context, JobInterrupted, PermanentError, RetryableError
from tasks.kinds import HANDLERS
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
# Where the heartbeat enforces deadlines (threads and solo pools), how often it looks.
DEADLINE_STEP = 0.25
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

    def has_pending(self) -> bool:
        return self._pending is not None

    def touch(self) -> None:
        """Count an interval from now: the next value is held back for the heartbeat to write."""
        self._last_write = time.monotonic()

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
    on_lost: Callable[[str], None]
    # The attempt's deadline, when the heartbeat enforces it (no Celery time limit in this pool).
    deadline: float | None = None
    last_beat: float = field(default_factory=time.monotonic)
    renewed: float = field(default_factory=time.monotonic)  # when the lease was last renewed
    lost: str = ""  # why its lease is no longer its own (or its deadline passed): not its to settle
    stopped: str = ""  # why it was asked to stop (a cancel, a shutdown): still its to settle


class Heartbeat:
    """One thread per worker process that renews the leases of the attempts it runs.

    An attempt that is no longer its own when the leases are renewed (cancelled, taken over), or whose
    lease could not be renewed for so long that it is about to run out (the database is unreachable),
    is stopped through `on_lost`, before another worker may take it. Where no Celery time limit
    reaches the job (threads, solo), the deadlines are enforced here too, first and without the
    database, so that a slow database never delays them. The database work of one beat is bounded
    (`statement_timeout`, `lock_timeout`): one job's locked row cannot hold every other job's lease.
    """

    @staticmethod
    def get() -> "Heartbeat":
        return _heartbeat()  # threads do not survive a fork: a forked process starts its own

    def __init__(self) -> None:
        self._watched: dict[int, Watched] = {}  # by id(Watched): two attempts of one job are two entries
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="conveyor-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def watching(job_id: str, task_id: str | None = None) -> list[Watched]:
        """The attempts of `job_id` (under Celery task `task_id`, if given) that this process runs; never
        starts a heartbeat."""
        instance = _heartbeat.peek()
        if instance is None:
            return []
        with instance._lock:
            return [
                w
                for w in instance._watched.values()
                if str(w.job.pk) == job_id and (task_id is None or w.job.task_id == task_id)
            ]

    def stop(self, watched: Watched, reason: str) -> None:
        """Stop an attempt this process runs (a cancel or a shutdown that reached a threads or solo
        pool). Unlike a lost lease, the attempt is still its own to settle."""
        if not watched.lost and not watched.stopped:
            log.warning("job %s: stopping it: %s", watched.job.pk, reason)
            watched.stopped = reason
            watched.on_lost(reason)

    @contextmanager
    def watch(
        self, job: Job, reporter: Reporter, on_lost: Callable[[str], None], deadline: float | None = None
    ) -> Iterator[Watched]:
        watched = Watched(job, reporter, on_lost, deadline)
        with self._lock:
            self._watched[id(watched)] = watched
        try:
            yield watched
        finally:
            with self._lock:
                self._watched.pop(id(watched), None)

    def _still_watched(self, watched: Watched) -> bool:
        with self._lock:
            return self._watched.get(id(watched)) is watched

    def _loop(self) -> None:
        while True:
            time.sleep(min(settings.JOBS_HEARTBEAT_SECONDS, settings.JOBS_PROGRESS_MIN_INTERVAL_SECONDS, DEADLINE_STEP))
            with self._lock:
                watched = [w for w in self._watched.values() if not w.lost]
            if not watched:
                connection.close()  # no job to watch: hold no database connection meanwhile
                continue
            now = time.monotonic()
            for w in watched:  # first, and without the database
                if w.deadline is not None and now >= w.deadline:
                    self._lose(w, f"timed out after {w.job.timeout_seconds}s")
            self._beat([w for w in watched if not w.lost])

    def _beat(self, watched: list[Watched]) -> None:
        """The database work of one beat, bounded: the leases that are due, renewed with one statement
        that skips rows locked elsewhere; then the progress held back, each write on its own."""
        interval = settings.JOBS_HEARTBEAT_SECONDS
        # Stop a job whose lease could not be renewed this long: two beats before it would run out.
        give_up_after = max(interval, settings.JOBS_LEASE_SECONDS - 2 * interval)
        due = [w for w in watched if time.monotonic() - w.last_beat >= interval]
        try:
            close_old_connections()
            if due:
                with transaction.atomic():
                    _bound(min(interval, 2.0))
                    held = lifecycle.heartbeats([w.job for w in due])
                self._renewed(due, held, give_up_after)
            for w in watched:
                if not w.reporter.has_pending():
                    w.reporter.touch()  # progress goes through this thread: a handler never holds a connection for it
            if not any(w.reporter.has_pending() for w in watched):
                return
            with transaction.atomic():
                _bound(0.2)  # a locked row costs its own progress write this much, no more
                for w in watched:
                    try:
                        with transaction.atomic():
                            w.reporter.flush()
                    except DatabaseError as exc:
                        log.info("job %s: progress not written this time: %s", w.job.pk, exc)
        except Exception as exc:
            connection.close()
            for w in due:
                if time.monotonic() - w.renewed >= give_up_after:
                    self._lose(w, f"its lease could not be renewed for {give_up_after:g}s ({type(exc).__name__})")
            log.warning("heartbeat failed (%d job(s)): %s", len(watched), exc)

    def _renewed(self, due: list[Watched], held: dict, give_up_after: float) -> None:
        renewed_at = time.monotonic()
        for w in due:
            w.last_beat = renewed_at
            renewed = held.get((w.job.pk, w.job.lease))
            if renewed:
                w.renewed = renewed_at
            elif renewed is None and self._still_watched(w):
                self._lose(w, "the job is no longer this attempt's (cancelled or taken over)")
            elif renewed_at - w.renewed >= give_up_after:  # its row stayed locked elsewhere
                self._lose(w, f"its lease could not be renewed for {give_up_after:g}s (its row is locked)")

    def _lose(self, watched: Watched, reason: str) -> None:
        log.warning("job %s: stopping it: %s", watched.job.pk, reason)
        watched.lost = reason
        watched.on_lost(reason)


def _bound(seconds: float) -> None:
    """Bound the statements of the current transaction, and their waits for locks."""
    milliseconds = max(50, int(seconds * 1000))
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL statement_timeout = {milliseconds}; SET LOCAL lock_timeout = {milliseconds}")


@per_process
def _heartbeat() -> Heartbeat:
    return Heartbeat()


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
