"""Errors a job handler raises to tell the platform what to do with a failed attempt."""


class JobError(Exception):
    """Base class; the message is shown to the job's owner, so it must never hold a secret."""


class RetryableError(JobError):
    """A passing failure (network, timeout, 429/5xx): try again after a backoff, if attempts remain.

    `retry_after` (seconds), when the remote side said how long to wait, replaces the computed backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(JobError):
    """A failure that another attempt would repeat (bad input, 4xx): fail the job at once."""


class JobInterrupted(BaseException):
    """Raised in a running job when its process is told to stop (cancel, worker shutdown).

    A BaseException so that a handler's `except Exception` does not swallow it.
    """
