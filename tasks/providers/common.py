"""What the providers share: how a generation ended, one HTTP client per provider and process, cutting
a stream from another thread, and errors translated (the key redacted from every message)."""

import contextlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai

from project.processes import per_process
from tasks import interrupts
from tasks.context import PermanentError, RetryableError

# Anything that looks like a provider key, in case a server echoes a key other than the one we sent.
KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,})")


@dataclass
class Generation:
    text: str = ""
    model: str = ""
    finish_reason: str | None = None
    usage: dict[str, int | None] = field(default_factory=lambda: {"input_tokens": None, "output_tokens": None})


OnDelta = Callable[[str], None]


@per_process
def http_client(provider: str) -> Any:
    """One HTTP client per provider and process, shared by every call (and every thread of a threads
    pool): building one costs ~20 ms of CPU (its TLS context), more than a short generation. It holds
    connections, never a key."""
    sdk = openai if provider == "openai" else anthropic
    return sdk.DefaultHttpxClient()


def cut(response: Any) -> None:
    """End a streamed answer from another thread: shut its socket down, which wakes the read that waits
    on it (closing the socket or the response would not, and the response is not the caller's to
    touch). The reading thread then sees the connection end and the SDK raises. The request was sent
    with `Connection: close` (`stream_headers`), so the socket is never one that another job reuses."""
    if response.is_closed:
        return
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def stream_headers() -> dict[str, str] | None:
    """Headers of a streamed request: where the stream may be cut from another thread, a connection
    of its own (not kept alive for the next request: once this one returns it to the pool, a cut meant
    for this job could reach another's)."""
    return {"Connection": "close"} if interrupts.stops_in_place() else None


def redact(message: str, key: str) -> str:
    if key:
        message = message.replace(key, "[redacted]")
    return KEY_PATTERN.sub("[redacted]", message)


def retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate(exc: Exception, provider: str, key: str) -> Exception:
    """The SDK's exception as the platform's: 429, 5xx, timeouts and lost connections are passing."""
    status = getattr(exc, "status_code", None)
    detail = redact(getattr(exc, "message", None) or str(exc), key)
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return RetryableError(f"{provider}: timed out")
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return RetryableError(f"{provider}: connection failed: {detail}")
    if status == 429 or (status is not None and status >= 500) or status == 408:
        return RetryableError(f"{provider} answered {status}: {detail}", retry_after=retry_after(exc.response))
    return PermanentError(f"{provider} refused the request ({status}): {detail}")
