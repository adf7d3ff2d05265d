"""The `echo` kind: returns its message. For health checks, tests and benchmarks."""

from typing import Any

from tasks import interrupts
from tasks.context import Context, RetryableError


def handle(ctx: Context) -> dict[str, Any]:
    payload = ctx.job.payload
    fail_times = payload.get("fail_times", 0)
    if ctx.job.attempt <= fail_times:
        raise RetryableError(
            f"echo fails its first {fail_times} attempt(s) on purpose (this was attempt {ctx.job.attempt})"
        )
    seconds = payload.get("sleep_ms", 0) / 1000
    steps = payload.get("progress_steps", 0)
    if steps:
        for step in range(1, steps + 1):
            interrupts.sleep(seconds / steps)
            ctx.report(100 * step / steps, f"step {step} of {steps}")
    elif seconds:
        interrupts.sleep(seconds)
    return {"message": payload["message"]}
