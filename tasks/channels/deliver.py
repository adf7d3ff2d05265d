"""One `message` job's delivery: the text split to the channel's rules, the send claimed once per text
and destination, each part sent after taking its place in the shared rate limits, and recorded as the
provider accepted it, so that a retry sends only the parts not yet delivered."""

from typing import Any

from django.conf import settings

from apps.jobs import ai_requests
from apps.messaging import ledger
from tasks import connections, interrupts
from tasks.channels import discord_api, mail, ratelimit, sms
from tasks.channels.common import Sent, inline_wait
from tasks.channels.splitting import split_discord, split_sms
from tasks.context import Context, PermanentError, RateLimited


def deliver(ctx: Context) -> dict[str, Any]:
    payload = ctx.job.payload
    channel, to = payload["channel"], destination(payload)
    parts = _parts(payload)
    ours = payload.get("from") or sms.sender()  # SMS: the number it goes out from
    if channel == "sms" and ledger.opted_out(ours, to):
        raise PermanentError(
            f"{to} opted out of SMS from {ours} (it replied STOP); nothing was sent. "
            "It receives messages again once it replies START."
        )
    holder, delivered_by_holder = ledger.claim(ctx.job.id, ledger.dedupe_key(ctx.job.owner_id, payload))
    if holder is not None and not delivered_by_holder:
        # the same text to the same destination is on its way in another job: wait for its outcome
        raise RateLimited(f"job {holder} is sending the same text to {to}: waiting for it", retry_after=5.0)
    if holder is not None:
        ctx.log(f"the same text went to {to} within {settings.MESSAGE_DEDUPE_SECONDS}s (job {holder}): not sent again")
        return {"channel": channel, "parts": len(parts), "delivered": ledger.deliveries(holder),
                "duplicate_of": str(holder)}  # fmt: skip
    done = ledger.delivered(ctx.job.id)  # parts an earlier attempt (or a put-off one) delivered
    send = _sender(ctx, payload)
    delivered: list[dict[str, Any]] = []
    for number, (text, meta) in enumerate(parts):
        if number in done:
            delivered.append({**ledger.as_item(done[number]), **meta})
            continue
        interrupts.check()
        connections.release()  # no pooled connection held while waiting for a slot or the provider
        _wait_for_limits(channel, to, ours)
        try:
            sent = send(text)
        except sms.OptedOutAtTwilio:
            ledger.record_opt_out(ours, to, "twilio:21610")  # opted out at Twilio: ours too
            raise
        segments = sent.segments if sent.segments is not None else meta.get("segments")
        item = ledger.record(ctx.job.id, number, channel=channel, to=to, provider_id=sent.provider_id,
                             status=sent.status, segments=segments)  # fmt: skip
        delivered.append({**item, **{k: v for k, v in meta.items() if k not in item}})
        ctx.report(100 * (number + 1) / len(parts), f"part {number + 1} of {len(parts)} sent")
    return {"channel": channel, "parts": len(parts), "delivered": delivered}


def destination(payload: dict[str, Any]) -> str:
    """Where the message goes: the address, or (a Discord webhook URL) the webhook's id, never its token."""
    if payload.get("to"):
        return payload["to"]
    return "webhook:" + discord_api.parse_webhook_url(payload["webhook_url"])[0]


def _parts(payload: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    text = payload["text"]
    if payload["channel"] == "discord":
        return [(part, {}) for part in split_discord(text)]
    if payload["channel"] == "sms":
        return [
            (part.text, {"segments": part.segments, "encoding": part.encoding})
            for part in split_sms(text, smart=settings.SMS_SMART_ENCODING)
        ]
    return [(text, {})]


def _limits(channel: str, to: str, sender: str) -> list[ratelimit.Limit]:
    destination = ratelimit.Limit(
        f"{channel}:to:{to.lower()}", settings.MESSAGE_DESTINATION_RATE_PER_SECOND, settings.MESSAGE_DESTINATION_BURST
    )
    if channel == "sms":
        # Twilio queues what a number sends beyond its rate: kept below it, a message never waits there.
        # Slots are paced a margin under the rate: a request leaves a little after its slot (a busy
        # thread), and the provider must not see more than the rate in any second (bench/messages.py).
        rate = settings.SMS_RATE_PER_SECOND * (1 - settings.MESSAGE_RATE_MARGIN)
        return [ratelimit.Limit(f"sms:from:{sender}", rate, 1), destination]
    if channel == "email":
        rate = settings.EMAIL_RATE_PER_SECOND
        return [ratelimit.Limit(f"email:host:{settings.EMAIL_HOST}", rate, max(1, int(rate))), destination]
    return []  # Discord: its own buckets, learned from its answers (tasks.channels.discord_api)


def _wait_for_limits(channel: str, to: str, sender: str) -> None:
    wait = ratelimit.acquire(_limits(channel, to, sender), max_wait=inline_wait(), sleep=interrupts.sleep)
    if wait:
        raise RateLimited(f"the {channel} rate limit is reached: next slot in {wait:.1f}s", retry_after=wait)


def _sender(ctx: Context, payload: dict[str, Any]) -> Any:
    channel, to = payload["channel"], destination(payload)
    if channel == "sms":
        return lambda text: sms.send(to, text, payload.get("from") or "")
    if channel == "email":
        msgid = mail.message_id(str(ctx.job.id))
        return lambda text: mail.send(
            to=to,
            subject=payload.get("subject") or "",
            text=text,
            html=payload.get("html"),
            msgid=msgid,
            in_reply_to=payload.get("in_reply_to") or "",
            references=payload.get("references") or "",
        )
    persona = ai_requests.personas().get(payload["persona"]) if payload.get("persona") else None
    if payload.get("webhook_url"):
        webhook_id, token = discord_api.parse_webhook_url(payload["webhook_url"])
        return lambda text: discord_api.send_to_webhook(webhook_id, token, text, **_as(persona))
    if persona is not None:
        return lambda text: _as_persona(to, text, persona)
    return lambda text: discord_api.send_to_channel(to, text)


def _as(persona: ai_requests.Persona | None) -> dict[str, str]:
    return {"username": persona.name, "avatar_url": persona.avatar_url} if persona else {}


def _as_persona(channel_id: str, text: str, persona: ai_requests.Persona) -> Sent:
    """Through the channel's webhook (found or made once, kept; made again if Discord deleted it)."""
    for _ in range(2):
        hook = ledger.discord_webhook(channel_id)
        if hook is None:
            try:
                hook = discord_api.find_or_create_webhook(channel_id)
            except discord_api.NoWebhooksHere:  # a DM or a thread, or no Manage Webhooks: as the bot
                return discord_api.send_to_channel(channel_id, text)
            ledger.keep_discord_webhook(channel_id, *hook)
        try:
            return discord_api.send_to_webhook(*hook, text, **_as(persona))
        except discord_api.UnknownWebhook:
            ledger.forget_discord_webhook(channel_id)
    raise PermanentError(f"Discord keeps losing the webhook of channel {channel_id}")
