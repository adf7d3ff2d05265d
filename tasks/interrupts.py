"""Interrupting a running job (SIGTERM in its pool process: a cancel, a worker's cold shutdown, the hard
time limit), and the few steps that must not be cut in the middle: unmounting a job's disk, releasing
its slot. An interruption that arrives during such a step is held until the step is over."""

from collections.abc import Iterator
from contextlib import contextmanager

from apps.jobs.errors import JobInterrupted

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
