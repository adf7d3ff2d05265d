"""LLM providers through their official SDKs, streaming. Each yields text deltas and returns how the
generation ended; errors come out as the platform's RetryableError / PermanentError, with the key
redacted from every message.
"""

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
from django.conf import settings

from apps.jobs.errors import PermanentError, RetryableError
from tasks import interrupts

# Anything that looks like a provider key, in case a server echoes a key other than the one we sent.
KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,})")


@dataclass
class Generation:
    text: str = ""
    model: str = ""
    finish_reason: str | None = None
    usage: dict[str, int | None] = field(default_factory=lambda: {"input_tokens": None, "output_tokens": None})


OnDelta = Callable[[str], None]


_http_clients: dict[tuple[str, int], Any] = {}
_http_clients_lock = threading.Lock()


def http_client(provider: str) -> Any:
    """One HTTP client per provider and process, shared by every call: building one costs ~20 ms of
    CPU (its TLS context), more than a short generation. It holds connections, never a key."""
    slot = (provider, os.getpid())  # a forked pool process makes its own
    with _http_clients_lock:  # threads of a threads pool share them
        if slot not in _http_clients:
            sdk = openai if provider == "openai" else anthropic
            _http_clients[slot] = sdk.DefaultHttpxClient()
        return _http_clients[slot]


def cut(response: Any) -> None:
    """End a streamed answer from another thread: shut its socket down, which wakes the read that waits
    on it (closing the socket or the response would not, and the response is not the caller's to
    touch). The reading thread then sees the connection end and the SDK raises."""
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def redact(message: str, key: str) -> str:
    if key:
        message = message.replace(key, "[redacted]")
    return KEY_PATTERN.sub("[redacted]", message)


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _translate(exc: Exception, provider: str, key: str) -> Exception:
    """The SDK's exception as the platform's: 429, 5xx, timeouts and lost connections are passing."""
    status = getattr(exc, "status_code", None)
    detail = redact(getattr(exc, "message", None) or str(exc), key)
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return RetryableError(f"{provider}: timed out")
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return RetryableError(f"{provider}: connection failed: {detail}")
    if status == 429 or (status is not None and status >= 500) or status == 408:
        return RetryableError(f"{provider} answered {status}: {detail}", retry_after=_retry_after(exc.response))
    return PermanentError(f"{provider} refused the request ({status}): {detail}")


def generate(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
    provider = request["provider"]
    call = _openai if provider == "openai" else _anthropic
    errors = (openai.APIError, anthropic.APIError)
    try:
        return call(request, key, on_delta)
    except errors as exc:
        # `from None`: the SDK's exception carries the request, and with it the key, in its context.
        raise _translate(exc, provider, key) from None
    except httpx2.TransportError as exc:  # the connection broke while the answer was streaming in
        raise RetryableError(f"{provider}: connection failed: {redact(str(exc), key)}") from None


def _openai(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
    client = openai.OpenAI(
        api_key=key,
        base_url=settings.OPENAI_BASE_URL,
        http_client=http_client("openai"),
        max_retries=0,  # the platform retries, with backoff, as a new attempt
        timeout=interrupts.time_left(settings.AI_REQUEST_TIMEOUT_SECONDS),  # none past the deadline
    )
    messages = [{"role": "system", "content": request["system"]}] if request["system"] else []
    messages += request["messages"]
    options: dict[str, Any] = {"max_tokens": request["max_tokens"]}
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


def _anthropic(request: dict[str, Any], key: str, on_delta: OnDelta) -> Generation:
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
    options: dict[str, Any] = {"max_tokens": request["max_tokens"]}
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
