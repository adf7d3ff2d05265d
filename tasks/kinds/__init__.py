"""One module per kind, each with `handle(ctx) -> dict` (see `tasks.context`). This mapping must cover
every kind of the catalogue, `apps.jobs.kinds.KINDS` (a test checks)."""

from tasks.context import Handler
from tasks.kinds import ai_generate, build, echo, lint, message, test

HANDLERS: dict[str, Handler] = {
    "echo": echo.handle,
    "ai_generate": ai_generate.handle,
    "build": build.handle,
    "test": test.handle,
    "lint": lint.handle,
    "message": message.handle,
}
