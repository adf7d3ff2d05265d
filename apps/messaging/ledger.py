"""The records that make a `message` job deliver once: which parts its provider accepted (a retry sends
only the others), and which job claimed a text to a destination (a second job within
MESSAGE_DEDUPE_SECONDS delivers nothing and names the first)."""

import hashlib
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.jobs.models import Job
from apps.messaging.deliveries import apply_early
from apps.messaging.models import Delivery, DiscordWebhook, OptOut, SendClaim

GIVEN_UP = (Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.TIMED_OUT)


def dedupe_key(owner_id: int, payload: dict[str, Any]) -> str:
    """The identity of a send: the same text to the same destination by the same owner. A reply in a
    conversation is also the answer to one inbound message: two messages get two answers, even alike."""
    names = ("channel", "to", "webhook_url", "persona", "subject", "text", "html", "inbound")
    fields = [str(owner_id)] + [str(payload.get(name) or "") for name in names]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()


def claim(job_id: UUID, key: str) -> tuple[UUID | None, bool]:
    """Claim the send for this job. Returns (None, False) when it is ours to send; else the job that
    holds it, and whether that job delivered it (it succeeded) or is still on its way. A holder that
    gave up (failed, cancelled, timed out) leaves the send to the next job that asks."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.MESSAGE_DEDUPE_SECONDS)
    # The usual case, no claim yet (or ours already): INSERT ... ON CONFLICT DO NOTHING and a look,
    # without a transaction.
    SendClaim.objects.bulk_create([SendClaim(key=key, job_id=job_id, expires_at=expires)], ignore_conflicts=True)
    if SendClaim.objects.filter(key=key, job_id=job_id).exists():
        return None, False
    for _ in range(2):  # a claim inserted by another job between our look and our insert: look again
        try:
            with transaction.atomic():
                held = SendClaim.objects.select_for_update().filter(key=key).first()
                if held is None:
                    SendClaim.objects.create(key=key, job_id=job_id, expires_at=expires)
                    return None, False
                if held.job_id == job_id:
                    return None, False
                status = Job.objects.filter(pk=held.job_id).values_list("status", flat=True).first()
                if held.expires_at <= now or status is None or status in GIVEN_UP:
                    held.job_id, held.expires_at = job_id, expires
                    held.save(update_fields=["job", "expires_at"])
                    return None, False
                return held.job_id, status == Job.Status.SUCCEEDED
        except IntegrityError:
            continue
    raise IntegrityError("the send claim kept changing hands")


def delivered(job_id: UUID) -> dict[int, Delivery]:
    return {d.part: d for d in Delivery.objects.filter(job_id=job_id)}


def record(job_id: UUID, part: int, *, channel: str, to: str, provider_id: str, status: str,
           segments: int | None) -> dict[str, Any]:  # fmt: skip
    """A part its provider accepted (one statement), with a status that came before it, if any.
    Returns the part as the job's result lists it."""
    row = Delivery(job_id=job_id, part=part, channel=channel, to=to, provider_id=provider_id, status=status,
                   rank=Delivery.RANK.get(status, 0), segments=segments)  # fmt: skip
    Delivery.objects.bulk_create(
        [row],
        update_conflicts=True,
        unique_fields=["job", "part"],
        update_fields=["channel", "to", "provider_id", "status", "rank", "segments"],
    )
    if provider_id and apply_early(provider_id):  # a status callback that came before this record
        row = Delivery.objects.get(job_id=job_id, part=part)
    return as_item(row)


def as_item(d: Delivery) -> dict[str, Any]:
    item: dict[str, Any] = {"id": d.provider_id, "part": d.part, "status": d.status}
    if d.segments is not None:
        item["segments"] = d.segments
    if d.error_code:
        item["error_code"] = d.error_code
    return item


def deliveries(job_id: UUID) -> list[dict[str, Any]]:
    """Each delivered part, in order, with its latest status."""
    return [as_item(d) for d in Delivery.objects.filter(job_id=job_id).order_by("part")]


def opted_out(our_address: str, their_address: str) -> bool:
    """Whether `their_address` opted out of SMS from `our_address`. Sent through a messaging service
    (an "MG..." sid, whose numbers share their opt-outs at Twilio), from any number of ours."""
    found = OptOut.objects.filter(their_address=their_address)
    if not our_address.startswith("MG"):
        found = found.filter(our_address=our_address)
    return found.exists()


def record_opt_out(our_address: str, their_address: str, keyword: str) -> None:
    OptOut.objects.get_or_create(our_address=our_address, their_address=their_address, defaults={"keyword": keyword})


def discord_webhook(channel_id: str) -> tuple[str, str] | None:
    from apps.credentials.crypto import decrypt

    hook = DiscordWebhook.objects.filter(channel_id=channel_id).first()
    return (hook.webhook_id, decrypt(hook.token)) if hook else None


def keep_discord_webhook(channel_id: str, webhook_id: str, token: str) -> None:
    from apps.credentials.crypto import encrypt

    DiscordWebhook.objects.update_or_create(
        channel_id=channel_id, defaults={"webhook_id": webhook_id, "token": encrypt(token)}
    )


def forget_discord_webhook(channel_id: str) -> None:
    DiscordWebhook.objects.filter(channel_id=channel_id).delete()
