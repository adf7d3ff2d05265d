"""OpenAI and OpenAI-compatible servers (Chat Completions, streamed)."""

from typing import Any

import openai
from django.conf import settings

from tasks import interrupts
from tasks.providers.common import Generation, OnDelta, cut, http_client, stream_headers


def generate(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
    client = openai.OpenAI(
        api_key=key,
        base_url=settings.OPENAI_BASE_URL,
        http_client=http_client("openai"),
        max_retries=0,  # the platform retries, with backoff, as a new attempt
        timeout=interrupts.time_left(settings.AI_REQUEST_TIMEOUT_SECONDS),  # none past the deadline
    )
    messages = [{"role": "system", "content": request["system"]}] if request["system"] else []
    messages += request["messages"]
    options: dict[str, Any] = {"max_tokens": request["max_tokens"], "extra_headers": stream_headers()}
    if request["temperature"] is not None:
        options["temperature"] = request["temperature"]
    out = Generation(model=request["model"])
    with (
        client.chat.completions.create(
            model=request["model"], messages=messages, stream=True, stream_options={"include_usage": True}, **options
        ) as stream,
        interrupts.on_interrupt(lambda: cut(stream.response)),
    ):  # a cancel or the deadline ends the read
        for chunk in stream:
            out.model = chunk.model or out.model
            if chunk.usage:
                out.usage = {"input_tokens": chunk.usage.prompt_tokens, "output_tokens": chunk.usage.completion_tokens}
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    out.text += choice.delta.content
                    on_delta(choice.delta.content)
                if choice.finish_reason:
                    out.finish_reason = choice.finish_reason
    return out
