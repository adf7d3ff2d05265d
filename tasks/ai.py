"""The `ai_generate` kind: one streamed generation with the owner's key (or the server's)."""

from typing import Any

from django.conf import settings

from apps.credentials.services import key_for
from apps.jobs import live
from apps.jobs.errors import PermanentError
from apps.jobs.models import Job
from tasks import providers
from tasks.types import Report

SERVER_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def handle(job: Job, report: Report) -> dict[str, Any]:
    request = job.payload
    provider = request["provider"]
    key = key_for(job.owner_id, provider) or getattr(settings, SERVER_KEYS[provider])
    if not key:
        raise PermanentError(f"no credential for provider {provider}")
    produced = 0

    def on_delta(text: str) -> None:
        nonlocal produced
        produced += len(text)
        live.publish(job.pk, {"type": "text", "delta": text})
        # Tokens are not counted while streaming; about four characters each is close enough for a bar.
        report(min(95, 5 + 90 * produced / (4 * request["max_tokens"])), "generating")

    out = providers.generate(request, key, on_delta)
    del key
    return {
        "text": out.text,
        "provider": provider,
        "model": out.model,
        "usage": out.usage,
        "finish_reason": out.finish_reason,
    }
