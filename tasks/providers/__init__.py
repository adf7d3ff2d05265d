"""LLM providers through their official SDKs, streaming. Each yields text deltas and returns how the
generation ended; errors come out as the platform's RetryableError / PermanentError, with the key
redacted from every message.

`common` holds what they share; one module per provider API (`openai_chat`, `anthropic_messages`).
"""

from typing import Any

import anthropic
import httpx2
import openai

from tasks.context import RetryableError
from tasks.providers import anthropic_messages, openai_chat
from tasks.providers.common import Generation, OnDelta, http_client, redact, translate

__all__ = ["Generation", "generate", "http_client", "redact"]

CALLS = {"openai": openai_chat.generate, "anthropic": anthropic_messages.generate}


def generate(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
    provider = request["provider"]
    call = CALLS[provider]
    errors = (openai.APIError, anthropic.APIError)
    try:
        return call(request, key, on_delta)
    except errors as exc:
        # `from None`: the SDK's exception carries the request, and with it the key, in its context.
        raise translate(exc, provider, key) from None
    except httpx2.TransportError as exc:  # the connection broke while the answer was streaming in
        raise RetryableError(f"{provider}: connection failed: {redact(str(exc), key)}") from None
