"""The per-attempt context handed to a kind's handler, and the errors a handler raises.

A handler is `handle(ctx) -> dict`: it reads `ctx.job`, reports progress, writes to the job's log,
streams text, keeps artifacts, opens uploads and watches its deadline through `ctx`, and nothing else
of the platform. Modules under `tasks/kinds/` import nothing from `apps/`: this is their only door.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from uuid import UUID

from django.conf import settings

log = logging.getLogger(__name__)


class JobError(Exception):
    """Base class; the message is shown to the job's owner, so it must never hold a secret."""


class RetryableError(JobError):
    """A passing failure (network, timeout, 429/5xx): try again after a backoff, if attempts remain.

    `retry_after` (seconds), when the remote side said how long to wait, replaces the computed backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """The remote side (a 429) or a shared rate limit said "not now": tried again after `retry_after`
    seconds without counting the attempt (a bounded number of times, JOBS_MAX_DEFERRALS)."""

    counted = False


class PermanentError(JobError):
    """A failure that another attempt would repeat (bad input, 4xx): fail the job at once."""


class JobInterrupted(BaseException):
    """Raised in a running job when it is told to stop (cancel, worker shutdown, deadline, lost lease).

    A BaseException so that a handler's `except Exception` does not swallow it.
    """


@dataclass(frozen=True)
class JobView:
    """What a handler knows of its job."""

    id: UUID
    kind: str
    payload: dict[str, Any]
    owner_id: int
    attempt: int  # 1 for the first attempt
    timeout_seconds: int


class Context:
    """One attempt of one job, as its handler sees it. Built by `tasks.execution`."""

    def __init__(
        self,
        job: Any,
        report: Callable[[float, str], None],
        deadline: float,
        interrupted: Callable[[], str] = lambda: "",
    ) -> None:
        self._job = job
        self.job = JobView(job.pk, job.kind, job.payload, job.owner_id, job.attempts, job.timeout_seconds)
        self._report = report
        self.deadline = deadline  # on this process's monotonic clock
        self._interrupted = interrupted
        self._log: Any = None
        self._text_offset = 0  # bytes: where the next piece of streamed text starts
        self._text_chars = 0
        self._on_server_key = False  # the provider key handed out is the server's (a token budget)

    # --- progress, log, live text ----------------------------------------------------------------

    def report(self, percent: float, message: str = "") -> None:
        """Progress, 0-100, with a short message (written at most every JOBS_PROGRESS_MIN_INTERVAL_SECONDS;
        the latest value is never lost)."""
        self._report(percent, message)

    @property
    def output(self) -> Any:
        """The job's log as an output for commands (`tasks.sandbox.runner.Output`): stored in capped
        chunks and published live. Made on first use."""
        if self._log is None:
            from tasks.sandbox.joblog import JobLog

            self._log = JobLog(self.job.id)
        return self._log

    def log(self, text: str) -> None:
        """A line of the job's log."""
        self.output.line(text)

    def stream_text(self, delta: str) -> None:
        """A piece of generated text, to live subscribers as it arrives (kept for those who come late),
        with progress: about four characters a token, against the request's `max_tokens`."""
        from apps.jobs import live

        live.publish_text(self.job.id, self.job.attempt, self._text_offset, delta)
        self._text_offset += len(delta.encode())
        self._text_chars += len(delta)
        max_tokens = self.job.payload.get("max_tokens") or 1
        self.report(min(95, 5 + 90 * self._text_chars / (4 * max_tokens)), "generating")

    # --- files ---------------------------------------------------------------------------------

    @property
    def artifact_name_max(self) -> int:
        """The longest name an artifact may have (its path in the tree)."""
        from tasks import artifacts

        return artifacts.NAME_MAX

    def keep_artifact(self, name: str, f: IO[bytes], size: int) -> dict[str, Any]:
        """Store `size` bytes of the open file `f` as the job's artifact `name` (replacing one an
        earlier attempt kept); returns its description (name, size, sha256, url). The file is the
        caller's to open safely (`tasks.sandbox.files.JobTree`)."""
        from tasks import artifacts

        return artifacts.describe(artifacts.store(self._job, name, f, size))

    def drop_artifacts_except(self, names: set[str]) -> None:
        """Remove what an earlier attempt kept and this one did not keep again."""
        from tasks import artifacts

        artifacts.drop_others(self._job, names)

    @contextmanager
    def open_upload(self, upload_id: str) -> Iterator[IO[bytes]]:
        """An upload of the job's owner, opened for reading; PermanentError if it is gone (or not
        theirs)."""
        from apps.jobs.models import Upload

        upload = Upload.objects.filter(pk=upload_id, owner_id=self.job.owner_id).first()
        if upload is None:
            raise PermanentError(f"upload {upload_id} no longer exists")
        with upload.file.open("rb") as f:
            yield f

    # --- secrets -------------------------------------------------------------------------------

    def provider_key(self, provider: str) -> str | None:
        """The owner's key for an LLM provider, else the server's (within the owner's daily token
        budget on it: PermanentError when spent), else None. Drop it after the call."""
        from apps.credentials import budgets
        from apps.credentials.services import key_for
        from tasks import connections

        key = key_for(self.job.owner_id, provider)
        self._on_server_key = not key and bool(getattr(settings, SERVER_KEYS[provider], ""))
        if self._on_server_key:
            if problem := budgets.refusal(self.job.owner_id):
                raise PermanentError(problem)
            key = getattr(settings, SERVER_KEYS[provider])
        connections.release()  # the call that follows waits: a pooled connection goes back meanwhile
        return key or None

    def count_usage(self, usage: dict[str, int | None] | None) -> None:
        """What a generation used, against the owner's daily budget when it ran on the server's key:
        the provider's count, or (a generation stopped midway, a server that reports none) an
        estimate of four characters a token, of the request and of the text streamed so far."""
        if not (self._on_server_key and settings.AI_USER_DAILY_TOKENS):
            return
        from apps.credentials import budgets

        counted = [n for n in (usage or {}).values() if n is not None]
        if counted:
            tokens = sum(counted)
        else:
            request = self.job.payload if isinstance(self.job.payload, dict) else {}
            sent = sum(len(str(m.get("content", ""))) for m in request.get("messages") or [] if isinstance(m, dict))
            tokens = (sent + len(str(request.get("system") or "")) + self._text_chars) // 4 + 1
        try:
            budgets.spend(self.job.owner_id, tokens)
        except Exception:  # never hide the attempt's own outcome behind a failed count
            log.warning("could not count %d tokens of job %s against its owner's budget", tokens, self.job.id)

    # --- time ----------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the attempt was told to stop (cancelled, deadline, lease lost, worker going)."""
        return bool(self._interrupted())

    def close(self) -> None:
        """The end of the attempt: the log's last lines are written."""
        if self._log is not None:
            self._log.close()


SERVER_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

# handle(ctx) -> result: what every kind's module provides.
Handler = Callable[[Context], dict[str, Any]]
