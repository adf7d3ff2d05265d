"""Interrupting a running job, and the few steps that must not be cut in the middle.

A job is interrupted when it is cancelled, when its worker shuts down, when it passes its deadline, or
when its lease is lost. How the interruption reaches the handler depends on the pool:

- **prefork** (a pool process, the job in its main thread): SIGTERM (revoke with terminate, a cold
  shutdown, the hard time limit) raises JobInterrupted in the handler, wherever it is.
- **threads** (or solo): nothing can be raised in another thread, so the attempt is marked interrupted,
  the callbacks its handler registered with `on_interrupt` run (a provider closes its HTTP stream,
  which ends the read that waits on it), and `sleep` wakes at once. The platform's deadline is enforced
  by the heartbeat there, since Celery's time limits need the prefork pool.

An interruption that arrives during an `uninterrupted` step (unmounting a job's disk, releasing its
slot) is held until the step is over.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tasks.context import JobInterrupted

_depth = 0
_held: str | None = None


def interrupt(reason: str) -> None:
    """Raise JobInterrupted in the running job now, or as soon as its current critical step ends.
    Called from the SIGTERM handler, which runs in the main thread."""
    global _held
    if _depth:
        _held = reason
        return
    raise JobInterrupted(reason)


@contextmanager
def uninterrupted() -> Iterator[None]:
    global _depth, _held
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held is not None:
            reason, _held = _held, None
            raise JobInterrupted(reason)


@dataclass
class Attempt:
    """The attempt running in this thread: its deadline (on this process's monotonic clock) and, once
    it is interrupted from another thread, why."""

    deadline: float
    # True where the interruption comes from another thread (threads, solo pools), not as SIGTERM.
    in_place: bool = False
    reason: str = ""
    _callbacks: list[Callable[[], object]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _event: threading.Event = field(default_factory=threading.Event)

    def interrupt(self, reason: str) -> None:
        # The callbacks run under the lock that `on_interrupt` takes to unregister them: once its block
        # is over, no callback of it runs (its stream may be another job's by then).
        with self._lock:
            if self.reason:
                return
            self.reason = reason
            self._event.set()
            for callback in self._callbacks:
                try:
                    callback()
                except Exception:  # noqa: S112 (closing what is already broken: nothing to add)
                    continue

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


_local = threading.local()


def current() -> Attempt | None:
    return getattr(_local, "attempt", None)


@contextmanager
def running(attempt: Attempt) -> Iterator[Attempt]:
    _local.attempt = attempt
    try:
        yield attempt
    finally:
        _local.attempt = None


def check() -> None:
    """Raise JobInterrupted if the attempt of this thread was interrupted from another one."""
    attempt = current()
    if attempt is not None and attempt.reason:
        raise JobInterrupted(attempt.reason)


@contextmanager
def on_interrupt(callback: Callable[[], object]) -> Iterator[None]:
    """Run `callback` (from another thread) if the attempt is interrupted while the block runs; at
    once if it already was. The callback must make the block end soon (close what it waits on)."""
    attempt = current()
    if attempt is None:
        yield
        return
    with attempt._lock:
        attempt._callbacks.append(callback)
        already = bool(attempt.reason)
    if already:
        callback()
    try:
        yield
    finally:
        with attempt._lock:
            attempt._callbacks.remove(callback)
    check()


def stops_in_place() -> bool:
    """Whether the running attempt would be stopped from another thread (threads, solo pools): then a
    connection it reads must be its own, never handed to another job afterwards (see `on_interrupt`)."""
    attempt = current()
    return attempt is not None and attempt.in_place


def sleep(seconds: float) -> None:
    """`time.sleep` that an interruption ends at once (JobInterrupted)."""
    attempt = current()
    if attempt is None:
        time.sleep(seconds)
        return
    if attempt._event.wait(seconds):
        check()


def time_left(default: float) -> float:
    """Seconds until the attempt's deadline (at most `default`), for a timeout of a call it makes."""
    attempt = current()
    return default if attempt is None else min(default, attempt.time_left())
