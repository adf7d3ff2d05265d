"""A running job's output: stored in capped chunks for `GET .../log/` and published live for SSE."""

import codecs
import time
from uuid import UUID

from django.conf import settings

from apps.jobs import live
from apps.jobs.logs import end_offset
from apps.jobs.models import LogChunk
from apps.jobs.statuses import LiveEvent
from tasks.sandbox.runner import Output

FLUSH_INTERVAL = 0.1  # seconds between writes while output keeps coming
PARTIAL_LINE_AFTER = 0.5  # a line without its newline yet (a prompt, a progress bar) waits this long
MAX_PENDING = 64 * 1024
REPLACEMENT = "\ufffd"


class JobLog(Output):
    """Output of a job's commands, line by line. The first line goes out at once; after that, lines
    are gathered for up to FLUSH_INTERVAL so that a chatty command costs a write per interval, not
    per line. Beyond JOB_LOG_MAX_BYTES the log ends with a visible truncation marker.

    Any bytes are kept: invalid UTF-8 and NUL (which PostgreSQL text cannot hold) are stored, and
    published, as U+FFFD."""

    def __init__(self, job_id: UUID) -> None:
        self.job_id = job_id
        self.offset = end_offset(job_id)
        self.limit = settings.JOB_LOG_MAX_BYTES
        self.truncated = self.offset >= self.limit
        self.first_write_at: float | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._pending_since = 0.0
        self._last_flush = 0.0

    def write(self, data: bytes) -> None:
        if self.truncated:
            return  # nothing more is kept: do not gather it either
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending += self._decoder.decode(data).replace("\0", REPLACEMENT)
        if len(self._pending) > MAX_PENDING or time.monotonic() - self._last_flush >= FLUSH_INTERVAL:
            self.flush()

    def tick(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        if now - self._pending_since >= PARTIAL_LINE_AFTER:
            self.flush(partial=True)
        elif now - self._last_flush >= FLUSH_INTERVAL:
            self.flush()

    def line(self, text: str) -> None:
        """A line of the platform's own (the command it runs, how it ended)."""
        self.flush(partial=True)
        self._store(text.replace("\0", REPLACEMENT).rstrip("\n") + "\n")

    def flush(self, partial: bool = False) -> None:
        # Whole lines; a line still without its end goes out anyway once it is long (output that never
        # prints a newline must not gather without bound) or has waited PARTIAL_LINE_AFTER (tick).
        cut = self._pending.rfind("\n") + 1
        if partial or len(self._pending) - cut > MAX_PENDING:
            cut = len(self._pending)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if text:
            self._pending_since = time.monotonic()
            self._store(text)

    def close(self) -> None:
        self._pending += self._decoder.decode(b"", final=True).replace("\0", REPLACEMENT)
        self.flush(partial=True)

    def _store(self, text: str) -> None:
        self._last_flush = time.monotonic()
        if self.truncated:
            return
        try:
            data = text.encode()
        except UnicodeEncodeError:  # a lone surrogate (from a file name the platform notes)
            text = "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
            data = text.encode()
        if self.offset + len(data) > self.limit:
            kept = data[: max(0, self.limit - self.offset)].decode(errors="ignore")
            text = f"{kept}\n[conveyor] log truncated: it is longer than {self.limit} bytes; the rest is not kept\n"
            self.truncated = True
        if self.first_write_at is None:
            self.first_write_at = time.time()
        LogChunk.objects.create(job_id=self.job_id, offset=self.offset, text=text)
        live.publish(self.job_id, {"type": LiveEvent.LOG, "offset": self.offset, "text": text})
        self.offset += len(text.encode())
