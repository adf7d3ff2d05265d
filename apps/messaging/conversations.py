"""Inbound messages and the conversations they make: stored once, then answered one at a time per
conversation (an `ai_generate` job with the conversation's persona and recent history, then a `message`
job that sends its text back on the same channel to the same sender), so that replies go out in the
order the messages came in.

The chain moves on in the transaction that ends each job (`apps.jobs.signals.job_finished`): a job's end
and the next step commit together or not at all. A step that fails for good marks its inbound message
failed (kept, with the reason) and the conversation goes on with the next one; replaying the failed job
continues the chain from there.
"""

import logging
import time
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction

from apps.jobs import ai_requests, live
from apps.jobs.kinds import MESSAGE_TEXT_MAX, AIGeneratePayload, persona_name_problem
from apps.jobs.lifecycle import storable
from apps.jobs.models import Job
from apps.jobs.services import submit_job
from apps.messaging import deliveries, ledger
from apps.messaging.models import Channel, Conversation, Message, OptOut

log = logging.getLogger(__name__)

# Carrier and Twilio keywords (alone in the message, any case). Twilio answers STOP and START itself
# on long codes; we record them so that we never call Twilio for an opted-out number.
OPT_OUT = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
OPT_IN = {"START", "UNSTOP"}
HELP = {"HELP", "INFO"}
CHARS_PER_TOKEN = 4
MAX_CONTENT = 100_000  # characters of one turn (merged turns stay within AIGeneratePayload's 200,000)


def inbox_owner() -> Any:
    """The user who owns what strangers start by writing in (MESSAGING_OWNER)."""
    User = get_user_model()
    user, created = User.objects.get_or_create(username=settings.MESSAGING_OWNER)
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def receive(
    channel: str,
    *,
    our_address: str,
    their_address: str,
    text: str,
    external_id: str,
    subject: str = "",
    references: str = "",
    conversation: Conversation | None = None,
) -> Message | None:
    """Store an inbound message and start (or queue) its answer. None when this external id was stored
    already (a provider retrying its webhook): nothing happens twice. The text is a stranger's: NULs
    and lone surrogates are cleaned, and an empty one is kept but not answered."""
    text, subject, references, external_id = (storable(v) for v in (text, subject, references, external_id))
    with transaction.atomic():
        if conversation is None:
            conversation, _ = Conversation.objects.get_or_create(
                channel=channel,
                our_address=our_address,
                their_address=their_address,
                defaults={"owner": inbox_owner(), "persona": settings.CONVERSATION_PERSONA},
            )
        try:
            with transaction.atomic():
                message = Message.objects.create(
                    conversation=conversation,
                    direction=Message.Direction.IN,
                    text=text,
                    subject=subject[:998],
                    external_id=external_id[:255],
                    references=references,
                    status=Message.Status.RECEIVED,
                )
        except IntegrityError:
            return None
        conversation.save(update_fields=["updated_at"])
        if channel == Channel.SMS and _keyword(message):
            return message
        if not text.strip():  # a picture alone, an empty email: nothing for the model to answer
            message.status, message.error = Message.Status.HANDLED, "no text to answer"
            message.save(update_fields=["status", "error"])
            return message
        if _too_many(channel, their_address):  # each answer costs a model call: a flood is kept, unanswered
            message.status = Message.Status.HANDLED
            message.error = f"not answered: over {settings.MESSAGE_INBOUND_PER_HOUR} messages an hour from this sender"
            message.save(update_fields=["status", "error"])
            return message
        advance(conversation.pk)
    return message


def _too_many(channel: str, sender: str) -> bool:
    """Whether a sender is over MESSAGE_INBOUND_PER_HOUR answered messages in the current hour (a
    counter in Redis per sender and hour, shared by every web process). 0: no limit."""
    limit = settings.MESSAGE_INBOUND_PER_HOUR
    if not limit:
        return False
    key = f"conveyor:inbound:{channel}:{sender}:{int(time.time() // 3600)}"
    try:
        with live.client().pipeline() as pipe:
            count, _ = pipe.incr(key).expire(key, 3700).execute()
    except Exception:  # Redis away: answer rather than drop
        log.warning("inbound rate of %s %s unknown (Redis unreachable)", channel, sender, exc_info=True)
        return False
    return count > limit


def _keyword(message: Message) -> bool:
    """STOP, START and HELP, answered by the platform (never by the model). Whether it was one."""
    word = message.text.strip().upper()
    conversation = message.conversation
    if word in OPT_OUT:
        ledger.record_opt_out(conversation.our_address, conversation.their_address, word)
    elif word in OPT_IN:
        OptOut.objects.filter(our_address=conversation.our_address, their_address=conversation.their_address).delete()
    elif word in HELP:
        job, _ = submit_job(conversation.owner, _reply_spec(conversation, message, settings.SMS_HELP_REPLY, None))
        message.job = job
    else:
        return False
    message.status = Message.Status.HANDLED
    message.save(update_fields=["status", "job"])
    return True


def advance(conversation_id: UUID) -> None:
    """Start answering the oldest waiting message of the conversation, unless one is being answered.
    A message whose step cannot even start is marked failed, and the next one is taken."""
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
        inbound = conversation.messages.filter(direction=Message.Direction.IN)
        if inbound.filter(status=Message.Status.ANSWERING).exists():
            return
        for message in inbound.filter(status=Message.Status.RECEIVED).order_by("created_at")[:100]:
            try:
                with transaction.atomic():
                    job, _ = submit_job(conversation.owner, _ai_spec(conversation, message))
                    message.ai_job, message.status = job, Message.Status.ANSWERING
                    message.save(update_fields=["ai_job", "status"])
                return
            except Exception as exc:
                log.exception("conversation %s: message %s could not be answered", conversation.pk, message.pk)
                message.status, message.error = Message.Status.FAILED, f"its answer could not be started: {exc}"[:2000]
                message.save(update_fields=["status", "error"])


def history(conversation: Conversation, upto: Message) -> list[dict[str, str]]:
    """The conversation up to `upto` as chat messages, each answer after the message it answers: the
    most recent that fit CONVERSATION_HISTORY_TOKENS (about four characters a token), `upto` always."""
    budget = settings.CONVERSATION_HISTORY_TOKENS * CHARS_PER_TOKEN
    earlier = list(
        conversation.messages.select_related("in_reply_to")
        .exclude(pk=upto.pk)
        .exclude(status__in=[Message.Status.HANDLED, Message.Status.RECEIVED])
        .exclude(direction=Message.Direction.IN, created_at__gt=upto.created_at)
        .order_by("-created_at")[:200]
    )

    def position(message: Message) -> tuple:
        if message.direction == Message.Direction.OUT and message.in_reply_to is not None:
            return (message.in_reply_to.created_at, 1, message.created_at)
        return (message.created_at, 0 if message.direction == Message.Direction.IN else 1, message.created_at)

    turns: list[dict[str, str]] = []
    used = len(upto.text)
    for message in sorted(earlier, key=position, reverse=True):
        if not message.text or used + len(message.text) > budget:
            break
        used += len(message.text)
        role = "user" if message.direction == Message.Direction.IN else "assistant"
        turns.append({"role": role, "content": message.text})
    turns.reverse()
    turns.append({"role": "user", "content": upto.text[: max(1, budget)]})
    for turn in turns:  # each within what a chat message may hold (the budget may be set higher)
        turn["content"] = turn["content"][:MAX_CONTENT]
    # chat APIs want the turns to alternate, starting with the user's: merge neighbours of one role
    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"] = (merged[-1]["content"] + "\n\n" + turn["content"])[-2 * MAX_CONTENT :]
        elif merged or turn["role"] == "user":
            merged.append(dict(turn))
    return merged


def _ai_spec(conversation: Conversation, message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {"messages": history(conversation, message), "dedupe": False}
    if conversation.persona and conversation.persona in ai_requests.personas():
        data["persona"] = conversation.persona
    request = AIGeneratePayload(data=data)
    request.is_valid(raise_exception=True)
    payload = {**request.validated_data, "conversation": str(conversation.pk), "inbound": str(message.pk)}
    return {"kind": "ai_generate", "payload": payload}


def _reply_spec(conversation: Conversation, inbound: Message, text: str, parent: Job | None) -> dict[str, Any]:
    channel = conversation.channel
    payload: dict[str, Any] = {
        "channel": channel,
        "to": conversation.their_address,
        "text": text[: MESSAGE_TEXT_MAX[channel]],
        "conversation": str(conversation.pk),
        "inbound": str(inbound.pk),
    }
    if channel == Channel.SMS:
        payload["from"] = conversation.our_address  # the number they wrote to (Twilio signed it)
    elif channel == Channel.EMAIL:
        subject = inbound.subject or "your message"
        payload["subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
        if inbound.external_id:
            payload["in_reply_to"] = inbound.external_id
            payload["references"] = inbound.references
    elif channel == Channel.DISCORD and conversation.persona:
        persona = ai_requests.personas().get(conversation.persona)
        if persona is not None and not persona_name_problem(persona.name):
            payload["persona"] = persona.name
    return {"kind": "message", "payload": payload, "parent": parent}


def on_job_finished(sender: Any, job: Job, **kwargs: Any) -> None:
    """The next step of a conversation, in the transaction that ended `job`. A failure here is logged
    and leaves that message failed; it never undoes the job's own ending, nor stops the conversation."""
    if job.kind == "message" and job.status == Job.Status.SUCCEEDED:
        deliveries.sync_result(job)
    inbound_id = job.payload.get("inbound")
    if not inbound_id:
        return
    try:
        with transaction.atomic():
            _next_step(job, inbound_id)
        return
    except Exception:
        log.exception("conversation step after job %s failed", job.pk)
    Message.objects.filter(pk=inbound_id).update(
        status=Message.Status.FAILED, error=f"the step after job {job.pk} could not be started (see the server log)"
    )
    conversation_id = Message.objects.filter(pk=inbound_id).values_list("conversation_id", flat=True).first()
    if conversation_id:
        try:
            with transaction.atomic():
                advance(conversation_id)
        except Exception:
            log.exception("conversation %s could not move on", conversation_id)


def _next_step(job: Job, inbound_id: str) -> None:
    inbound = Message.objects.select_related("conversation").filter(pk=inbound_id).first()
    if inbound is None:
        return
    conversation = inbound.conversation
    succeeded = job.status == Job.Status.SUCCEEDED
    if job.kind == "ai_generate":
        text = ((job.result or {}).get("text") or "").strip() if succeeded else ""
        if text:
            reply, _ = submit_job(conversation.owner, _reply_spec(conversation, inbound, text, job))
            inbound.job, inbound.ai_job, inbound.status, inbound.error = reply, job, Message.Status.ANSWERING, ""
            inbound.save(update_fields=["job", "ai_job", "status", "error"])
            return
        _failed(inbound, job, "the model's answer was empty" if succeeded else _reason(job))
    elif job.kind == "message":
        if inbound.status == Message.Status.HANDLED:  # the HELP answer: nothing follows
            return
        if succeeded and not (job.result or {}).get("duplicate_of"):
            delivered = (job.result or {}).get("delivered") or []
            Message.objects.create(
                conversation=conversation,
                direction=Message.Direction.OUT,
                text=job.payload.get("text", ""),
                subject=job.payload.get("subject", ""),
                external_id=(delivered[0].get("id") if delivered else "") or "",
                status=Message.Status.SENT,
                job=job,
                in_reply_to=inbound,
            )
        if succeeded:
            inbound.status, inbound.job, inbound.error = Message.Status.ANSWERED, job, ""
            inbound.save(update_fields=["status", "job", "error"])
        else:
            _failed(inbound, job, _reason(job))
    conversation.save(update_fields=["updated_at"])
    advance(conversation.pk)


def _reason(job: Job) -> str:
    error = job.error or {}
    return f"{job.kind} job {job.pk} {job.status}: {error.get('message') or job.status}"


def _failed(inbound: Message, job: Job, reason: str) -> None:
    inbound.status, inbound.error = Message.Status.FAILED, reason[:2000]
    if job.kind == "ai_generate":
        inbound.ai_job = job
    else:
        inbound.job = job
    inbound.save(update_fields=["status", "error", "ai_job", "job"])
