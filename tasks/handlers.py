"""Kind name -> handler. Must cover every kind of `apps.jobs.kinds.KINDS` (a test checks)."""

from tasks import build, echo, lint, testrun
from tasks.types import Handler

HANDLERS: dict[str, Handler] = {
    "echo": echo.handle,
    "build": build.handle,
    "test": testrun.handle,
    "lint": lint.handle,
}
