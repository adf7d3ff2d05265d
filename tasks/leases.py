"""An attempt's lease and progress, kept by one heartbeat thread per worker process.

`Reporter` is the handler's `report(percent, message)`: it writes at most one progress update per
interval and leaves the latest held-back value to the heartbeat. `Heartbeat` renews the leases of the
attempts the process runs, stops an attempt whose lease is lost, and, where no Celery time limit
reaches the job (threads, solo pools), its deadline.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction

from apps.jobs import lifecycle
from apps.jobs.models import Job
from project.processes import per_process

log = logging.getLogger(__name__)

# Where the heartbeat enforces deadlines (threads and solo pools), how often it looks.
DEADLINE_STEP = 0.25


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
        if not watched.stopped:
            self._lose(watched, reason, settle=True)

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

    def _lose(self, watched: Watched, reason: str, *, settle: bool = False) -> None:
        """Stop the attempt, saying why; `settle`: the attempt still settles itself (it was asked to
        stop), else its lease or deadline is lost and it must not (see `execution._interrupted`)."""
        if watched.lost:
            return
        log.warning("job %s: stopping it: %s", watched.job.pk, reason)
        if settle:
            watched.stopped = reason
        else:
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
