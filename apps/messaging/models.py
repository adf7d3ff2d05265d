"""What comes in and goes out on the message channels: conversations and their messages, each sent
part's delivery (the ledger that makes a retry send only what was not sent), the claims that deliver
the same text to the same destination once, opt-outs, and the Discord webhooks personas speak through."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Channel(models.TextChoices):
    DISCORD = "discord"
    SMS = "sms"
    EMAIL = "email"


class Conversation(models.Model):
    """One other party on one channel, talking to one of our addresses (a Twilio number, the bot, our
    mailbox)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    channel = models.CharField(max_length=8, choices=Channel.choices)
    our_address = models.CharField(max_length=320)
    their_address = models.CharField(max_length=320)
    persona = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["channel", "our_address", "their_address"], name="conversation_parties")
        ]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="conversation_owner_updated")]
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return f"{self.channel}: {self.their_address} ↔ {self.our_address}"


class Message(models.Model):
    class Direction(models.TextChoices):
        IN = "in"
        OUT = "out"

    class Status(models.TextChoices):
        # inbound
        RECEIVED = "received"  # stored, waiting for its turn in the conversation
        ANSWERING = "answering"  # its AI reply and the reply's delivery are under way
        ANSWERED = "answered"
        FAILED = "failed"  # a step failed for good (see `error`); replaying that job continues
        HANDLED = "handled"  # a keyword (STOP, START, HELP) answered by the platform itself
        # outbound
        SENDING = "sending"
        SENT = "sent"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    direction = models.CharField(max_length=3, choices=Direction.choices)
    text = models.TextField(blank=True)
    subject = models.CharField(max_length=998, blank=True)
    # The provider's id: Twilio's MessageSid, Discord's message id, the email's Message-ID.
    external_id = models.CharField(max_length=255, blank=True)
    references = models.TextField(blank=True)  # email: the References chain it carried
    status = models.CharField(max_length=10, choices=Status.choices)
    error = models.TextField(blank=True)
    # inbound: the AI job that answers it and the message job that sends the answer; outbound: its job
    ai_job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    job = models.ForeignKey("jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    in_reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A provider that retries a webhook (Twilio does) gives the same id: stored once.
            models.UniqueConstraint(
                fields=["conversation", "direction", "external_id"],
                condition=~Q(external_id=""),
                name="message_external_id",
            )
        ]
        indexes = [models.Index(fields=["conversation", "created_at"], name="message_conversation_created")]
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.direction} {self.status}: {self.text[:40]}"


class Delivery(models.Model):
    """One part of a `message` job as its provider accepted it, and the latest status it reported."""

    RANK = {"queued": 0, "accepted": 0, "scheduled": 0, "sending": 1, "sent": 2, "delivered": 3,
            "read": 4, "undelivered": 3, "failed": 3, "canceled": 3}  # fmt: skip

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="+")
    part = models.PositiveIntegerField()
    channel = models.CharField(max_length=8, choices=Channel.choices)
    to = models.CharField(max_length=320)
    provider_id = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=16)
    rank = models.PositiveSmallIntegerField(default=0)
    segments = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=32, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "part"], name="delivery_job_part")]
        indexes = [models.Index(fields=["provider_id"], name="delivery_provider_id")]
        ordering = ["job", "part"]

    def __str__(self) -> str:
        return f"{self.channel} part {self.part} to {self.to}: {self.status}"


class EarlyStatus(models.Model):
    """A status callback that came before its part was recorded (Twilio answers the send, then calls
    back, while the worker is still writing the part down): applied when the part is recorded."""

    provider_id = models.CharField(max_length=255, primary_key=True)
    status = models.CharField(max_length=16)
    rank = models.PositiveSmallIntegerField(default=0)
    error_code = models.CharField(max_length=32, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.provider_id}: {self.status}"


class SendClaim(models.Model):
    """The same text to the same destination, claimed by the first job that sends it, until
    `expires_at` (MESSAGE_DEDUPE_SECONDS): another job finds the claim and delivers nothing."""

    key = models.CharField(max_length=64, primary_key=True)
    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.key[:12]} by {self.job_id}"


class OptOut(models.Model):
    """A phone number that sent STOP (or the like) to one of our numbers: no SMS goes to it from there."""

    our_address = models.CharField(max_length=32)
    their_address = models.CharField(max_length=32)
    keyword = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["our_address", "their_address"], name="optout_parties")]

    def __str__(self) -> str:
        return f"{self.their_address} opted out of {self.our_address} ({self.keyword})"


class DiscordWebhook(models.Model):
    """The webhook our bot made in a Discord channel, through which personas speak there."""

    channel_id = models.CharField(max_length=24, unique=True)
    webhook_id = models.CharField(max_length=24)
    token = models.TextField()  # encrypted with CREDENTIALS_KEYS
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"webhook {self.webhook_id} in {self.channel_id}"
