"""The `echo` kind: returns its message. For health checks, tests and benchmarks."""

from typing import Any

from apps.jobs.errors import RetryableError
from apps.jobs.models import Job
from tasks import interrupts
from tasks.types import Report


def handle(job: Job, report: Report) -> dict[str, Any]:
    payload = job.payload
    fail_times = payload.get("fail_times", 0)
    if job.attempts <= fail_times:
        raise RetryableError(
            f"echo fails its first {fail_times} attempt(s) on purpose (this was attempt {job.attempts})"
        )
    seconds = payload.get("sleep_ms", 0) / 1000
    steps = payload.get("progress_steps", 0)
    if steps:
        for step in range(1, steps + 1):
            interrupts.sleep(seconds / steps)
            report(100 * step / steps, f"step {step} of {steps}")
    elif seconds:
        interrupts.sleep(seconds)
    return {"message": payload["message"]}
