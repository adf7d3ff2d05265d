"""Kind name -> handler. Must cover every kind of `apps.jobs.kinds.KINDS` (a test checks)."""

from tasks import ai, build, echo, lint, testrun
from tasks.types import Handler

HANDLERS: dict[str, Handler] = {
    "echo": echo.handle,
    "ai_generate": ai.handle,
    "build": build.handle,
    "test": testrun.handle,
    "lint": lint.handle,
}
