"""The `ai_generate` kind: one streamed generation with the owner's key (or the server's)."""

from typing import Any

from django.conf import settings

from apps.credentials.services import key_for
from apps.jobs import live
from apps.jobs.errors import PermanentError
from apps.jobs.models import Job
from tasks import connections, providers
from tasks.types import Report

SERVER_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class TextStream:
    """Each piece of text as it arrives, to live subscribers (`live.publish_text` writes it to Redis
    without waiting for a reply), and progress with it."""

    def __init__(self, job: Job, report: Report) -> None:
        self.job = job
        self.report = report
        self.produced = 0  # characters, for progress
        self.offset = 0  # bytes, where the next piece starts in the attempt's text

    def add(self, text: str) -> None:
        live.publish_text(self.job.pk, self.job.attempts, self.offset, text)
        self.offset += len(text.encode())
        self.produced += len(text)
        # Tokens are not counted while streaming; about four characters each is close enough for a bar.
        self.report(min(95, 5 + 90 * self.produced / (4 * self.job.payload["max_tokens"])), "generating")


def handle(job: Job, report: Report) -> dict[str, Any]:
    request = job.payload
    provider = request["provider"]
    key = key_for(job.owner_id, provider) or getattr(settings, SERVER_KEYS[provider])
    if not key:
        raise PermanentError(f"no credential for provider {provider}")
    connections.release()
    stream = TextStream(job, report)
    out = providers.generate(request, key, stream.add)
    del key
    report(95, f"{len(out.text)} characters generated")
    return {
        "text": out.text,
        "provider": provider,
        "model": out.model,
        "usage": out.usage,
        "finish_reason": out.finish_reason,
    }
