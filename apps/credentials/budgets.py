"""Daily token budgets on the server's provider keys (AI_USER_DAILY_TOKENS per user and UTC day).

A user with a key of their own for the provider is not limited: their provider bills them. A job on
the server's key starts only while the owner's tokens of the day are under the budget, and what it
used (the provider's count, in and out) is added when its generation ends; one job may take the day
over the budget by its own size, the next one waits for tomorrow. Submitting such a job when the
budget is already spent is a 429 with the time it resets; a job that finds it spent when it starts
fails with that message (retry it tomorrow, or add a key of your own)."""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from apps.credentials.models import Credential, TokenUsage


def _today() -> datetime:
    return timezone.now().astimezone(UTC)


def seconds_to_reset() -> int:
    now = _today()
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


def used_today(owner_id: int) -> int:
    row = TokenUsage.objects.filter(owner_id=owner_id, day=_today().date()).values_list("tokens", flat=True)
    return row.first() or 0


def refusal(owner_id: int) -> str | None:
    """Why a job of `owner_id` may not use the server's keys now, or None."""
    budget = settings.AI_USER_DAILY_TOKENS
    if not budget:
        return None
    used = used_today(owner_id)
    if used < budget:
        return None
    return (
        f"the daily budget of {budget:,} tokens on the server's keys is used up ({used:,} used today); "
        f"it resets at 00:00 UTC, in {seconds_to_reset() // 60} minutes. A key of your own "
        "(POST /api/credentials/) has no such budget."
    )


def refusal_for_submission(owner_id: int, provider: str) -> str | None:
    """As `refusal`, for a job about to be submitted: None when the owner has a key of their own."""
    if not settings.AI_USER_DAILY_TOKENS or Credential.objects.filter(owner_id=owner_id, provider=provider).exists():
        return None
    return refusal(owner_id)


def spend(owner_id: int, tokens: int) -> None:
    """Add `tokens` to the owner's count of the day (one statement; concurrent jobs add up)."""
    if tokens <= 0:
        return
    table = TokenUsage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f'INSERT INTO "{table}" (owner_id, day, tokens) VALUES (%s, %s, %s) '  # noqa: S608 (model metadata)
            f'ON CONFLICT (owner_id, day) DO UPDATE SET tokens = "{table}".tokens + EXCLUDED.tokens',
            [owner_id, _today().date(), tokens],
        )
