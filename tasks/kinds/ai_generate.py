"""The `ai_generate` kind: one streamed generation with the owner's key (or the server's)."""

from typing import Any

from tasks import providers
from tasks.context import Context, PermanentError


def handle(ctx: Context) -> dict[str, Any]:
    request = ctx.job.payload
    provider = request["provider"]
    key = ctx.provider_key(provider)
    if not key:
        raise PermanentError(f"no credential for provider {provider}")
    try:
        out = providers.generate(request, key, ctx.stream_text)
    except BaseException:
        ctx.count_usage(None)  # stopped midway (cancelled, timed out, cut off): what streamed counts
        raise
    finally:
        del key
    ctx.count_usage(out.usage)
    ctx.report(95, f"{len(out.text)} characters generated")
    return {
        "text": out.text,
        "provider": provider,
        "model": out.model,
        "usage": out.usage,
        "finish_reason": out.finish_reason,
    }
