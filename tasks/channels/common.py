"""What every channel returns and raises, and how a provider's answer becomes one of the job errors."""

from dataclasses import dataclass

from django.conf import settings

from tasks import interrupts
from tasks.context import PermanentError, RateLimited, RetryableError


@dataclass(frozen=True)
class Sent:
    """A part the provider accepted: its id there, the status it gave, and (SMS) the billed segments."""

    provider_id: str
    status: str
    segments: int | None = None


def retry_after(headers: object) -> float | None:
    """Seconds from a `Retry-After` header (seconds only: the providers here never send a date)."""
    value = headers.get("Retry-After") if headers is not None and hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def by_status(status: int, message: str, *, wait: float | None = None) -> Exception:
    """The job error for a provider's HTTP answer: a 429 puts the job off (not counted), any other 4xx
    fails it at once with the provider's message, a 5xx is tried again with backoff."""
    if status == 429:
        return RateLimited(message, retry_after=wait if wait is not None else 1.0)
    if 400 <= status < 500:
        return PermanentError(message)
    return RetryableError(message, retry_after=wait)


def inline_wait() -> float:
    """How long a rate-limit wait may be sat out in the attempt (MESSAGE_MAX_INLINE_WAIT_SECONDS, and
    never into the attempt's last five seconds); a longer one puts the job off."""
    return min(settings.MESSAGE_MAX_INLINE_WAIT_SECONDS, max(0.0, interrupts.time_left(3600) - 5))
