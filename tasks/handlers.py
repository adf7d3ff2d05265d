"""Kind name -> handler. Must cover every kind of `apps.jobs.kinds.KINDS` (a test checks)."""

from tasks import echo
from tasks.types import Handler

HANDLERS: dict[str, Handler] = {
    "echo": echo.handle,
}
