"""Anthropic (Messages API, streamed)."""

from typing import Any

import anthropic
from django.conf import settings

from tasks import interrupts
from tasks.providers.common import Generation, OnDelta, cut, http_client, stream_headers


def generate(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
    client = anthropic.Anthropic(
        api_key=key,
        base_url=settings.ANTHROPIC_BASE_URL,
        http_client=http_client("anthropic"),
        max_retries=0,
        timeout=interrupts.time_left(settings.AI_REQUEST_TIMEOUT_SECONDS),  # none past the deadline
    )
    # Anthropic takes the system prompt apart from the turns.
    system = "\n\n".join(
        [request["system"]] * bool(request["system"])
        + [m["content"] for m in request["messages"] if m["role"] == "system"]
    )
    options: dict[str, Any] = {"max_tokens": request["max_tokens"], "extra_headers": stream_headers()}
    if system:
        options["system"] = system
    if request["temperature"] is not None:
        # This SDK no longer has a `temperature` argument; the Messages API (and compatible servers) still take it.
        options["extra_body"] = {"temperature": request["temperature"]}
    turns = [m for m in request["messages"] if m["role"] != "system"]
    out = Generation(model=request["model"])
    with (
        client.messages.stream(model=request["model"], messages=turns, **options) as stream,
        interrupts.on_interrupt(lambda: cut(stream.response)),
    ):
        for text in stream.text_stream:
            out.text += text
            on_delta(text)
        final = stream.get_final_message()
    out.model = final.model or out.model
    out.finish_reason = final.stop_reason
    out.usage = {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens}
    return out
