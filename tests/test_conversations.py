"""Inbound messages (Twilio's SMS webhook, the email webhook, the Discord bot's handler), the
conversations they make and the AI replies that go back, through a real worker to the local servers;
opt-out keywords and Twilio's delivery status callbacks."""

import hashlib
import hmac
import itertools
import uuid
from email.message import EmailMessage

import pytest
from django.conf import settings
from django.test import Client

from apps.jobs.models import Job
from apps.messaging.management.commands.run_discord_bot import inbound as discord_inbound
from apps.messaging.models import Conversation, Delivery, Message, OptOut
from tests.conftest import SmtpSink, client_for, wait_final, wait_for
from tests.factories import make_user, submit
from tests.fake_discord import FakeDiscord
from tests.fake_llm import FakeLLM
from tests.fake_twilio import FakeTwilio, signature

OUR_NUMBER = "+15550000001"
SMS_URL = "/webhooks/twilio/sms/"
STATUS_URL = "/webhooks/twilio/status/"


def twilio_post(path: str, params: dict[str, str], *, sign: bool = True, token: str = "") -> object:
    """POST as Twilio does: form-encoded, signed over the public URL with the account's auth token."""
    headers = {}
    if sign:
        url = settings.PUBLIC_BASE_URL + path
        headers["HTTP_X_TWILIO_SIGNATURE"] = signature(token or settings.TWILIO_AUTH_TOKEN, url, params)
    return Client().post(path, params, **headers)


def inbound_sms(sender: str, body: str, sid: str = "") -> dict[str, str]:
    sid = sid or "SM" + uuid.uuid4().hex
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": settings.TWILIO_ACCOUNT_SID, "From": sender,
            "To": OUR_NUMBER, "Body": body, "NumMedia": "0"}  # fmt: skip


def answered(message_id: object, timeout: float = 30) -> Message:
    return wait_for(
        lambda: (m := Message.objects.get(pk=message_id)).status in ("answered", "failed") and m,
        timeout,
        what="the inbound message to be answered",
    )


# --- signatures ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["missing", "wrong token", "other url", "tampered body"])
def test_a_bad_twilio_signature_gets_403_and_stores_nothing(how: str) -> None:
    params = inbound_sms("+15557770001", "hello")
    headers = {}
    if how == "wrong token":
        headers["HTTP_X_TWILIO_SIGNATURE"] = signature("not-the-token", settings.PUBLIC_BASE_URL + SMS_URL, params)
    elif how == "other url":
        headers["HTTP_X_TWILIO_SIGNATURE"] = signature(
            settings.TWILIO_AUTH_TOKEN, "https://evil.test" + SMS_URL, params
        )
    elif how == "tampered body":
        headers["HTTP_X_TWILIO_SIGNATURE"] = signature(
            settings.TWILIO_AUTH_TOKEN, settings.PUBLIC_BASE_URL + SMS_URL, {**params, "Body": "other"}
        )
    response = Client().post(SMS_URL, params, **headers)

    assert response.status_code == 403
    assert Message.objects.count() == 0
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_a_bad_email_signature_gets_403_and_stores_nothing() -> None:
    body = b"From: a@example.test\r\nTo: us@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
    for header in ({}, {"HTTP_X_CONVEYOR_SIGNATURE": "sha256=" + "0" * 64}):
        response = Client().post("/webhooks/email/", body, content_type="message/rfc822", **header)
        assert response.status_code == 403
    assert Message.objects.count() == 0


# --- SMS in, AI reply out -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_signed_inbound_sms_is_answered_by_sms_through_the_ai_with_the_chain_visible(
    worker, llm: FakeLLM, twilio: FakeTwilio
) -> None:
    llm.script.tokens = ["Your build ", "is green."]
    params = inbound_sms("+15557770002", "How is my build?")
    response = twilio_post(SMS_URL, params)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/xml")
    assert b"<Response" in response.content
    inbound = answered(Message.objects.get(external_id=params["MessageSid"]).pk)
    assert inbound.status == "answered", inbound.error
    (sms,) = twilio.messages
    assert (sms.to, sms.from_, sms.body) == ("+15557770002", OUR_NUMBER, "Your build is green.")
    # the chain: inbound message -> AI job -> reply job (its parent) -> outbound message
    ai_job, reply_job = Job.objects.get(pk=inbound.ai_job_id), Job.objects.get(pk=inbound.job_id)
    assert ai_job.kind == "ai_generate"
    assert ai_job.payload["inbound"] == str(inbound.pk)
    assert ai_job.payload["messages"][-1] == {"role": "user", "content": "How is my build?"}
    assert reply_job.kind == "message"
    assert reply_job.parent_id == ai_job.pk
    outbound = Message.objects.get(direction="out", in_reply_to=inbound)
    assert outbound.external_id == sms.sid
    assert outbound.job_id == reply_job.pk

    staff = client_for(make_user(staff=True))
    (listed,) = staff.get("/api/conversations/").json()["results"]
    assert listed["their_address"] == "+15557770002"
    assert listed["last_message"]["direction"] == "out"
    detail = staff.get(f"/api/conversations/{listed['id']}/").json()
    assert [(m["direction"], m["status"]) for m in detail["messages"]] == [("in", "answered"), ("out", "sent")]
    assert detail["messages"][0]["ai_job"] == str(ai_job.pk)
    assert detail["messages"][1]["deliveries"] == [{"part": 0, "id": sms.sid, "status": "queued", "error_code": None}]
    # someone else's conversation is not theirs to see
    assert client_for(make_user()).get(f"/api/conversations/{listed['id']}/").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_the_same_message_sid_twice_gets_one_reply(worker, llm: FakeLLM, twilio: FakeTwilio) -> None:
    params = inbound_sms("+15557770003", "hello twice")
    assert twilio_post(SMS_URL, params).status_code == 200
    assert twilio_post(SMS_URL, params).status_code == 200  # Twilio retried its webhook

    inbound = answered(Message.objects.get(external_id=params["MessageSid"]).pk)
    assert inbound.status == "answered"
    assert Message.objects.filter(direction="in").count() == 1
    assert len(twilio.messages) == 1


@pytest.mark.django_db(transaction=True)
def test_replies_follow_the_order_of_the_messages_and_carry_the_history(worker, llm: FakeLLM, twilio: FakeTwilio):
    llm.script.tokens = ["noted"]
    sender = "+15557770004"
    sids = []
    for n in range(3):
        params = inbound_sms(sender, f"message {n}")
        sids.append(params["MessageSid"])
        assert twilio_post(SMS_URL, params).status_code == 200
    last = answered(Message.objects.get(external_id=sids[-1]).pk, timeout=60)
    assert last.status == "answered", last.error

    inbound = list(Message.objects.filter(direction="in").order_by("created_at"))
    ai_jobs = [Job.objects.get(pk=m.ai_job_id) for m in inbound]
    replies = [Job.objects.get(pk=m.job_id) for m in inbound]
    assert [j.started_at < k.started_at for j, k in itertools.pairwise(replies)] == [True, True]
    assert replies[0].finished_at <= ai_jobs[1].created_at  # one at a time: the next waits for the reply
    assert [t["role"] for t in ai_jobs[2].payload["messages"]] == ["user", "assistant", "user", "assistant", "user"]


# --- opt-out ------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_stop_blocks_the_next_sms_and_start_lets_it_through(worker, api, llm: FakeLLM, twilio: FakeTwilio) -> None:
    sender = "+15557770005"
    assert twilio_post(SMS_URL, inbound_sms(sender, "  stop ")).status_code == 200
    assert OptOut.objects.filter(our_address=OUR_NUMBER, their_address=sender).exists()
    stop = Message.objects.get(conversation__their_address=sender)
    assert stop.status == "handled"
    assert stop.ai_job_id is None

    job = wait_final(submit(api, "message", {"channel": "sms", "to": sender, "text": "news"})["id"])
    assert job.status == "failed"
    assert job.attempts == 1
    assert "opted out" in job.error["message"]
    assert twilio.messages == []  # Twilio was never called

    assert twilio_post(SMS_URL, inbound_sms(sender, "START")).status_code == 200
    assert not OptOut.objects.filter(their_address=sender).exists()
    job = wait_final(submit(api, "message", {"channel": "sms", "to": sender, "text": "news again"})["id"])
    assert job.status == "succeeded", job.error
    assert [m.to for m in twilio.messages] == [sender]


@pytest.mark.django_db(transaction=True)
def test_help_gets_the_configured_reply(worker, twilio: FakeTwilio) -> None:
    assert twilio_post(SMS_URL, inbound_sms("+15557770006", "help")).status_code == 200
    wait_for(lambda: twilio.messages, what="the HELP reply")
    assert twilio.messages[0].body == settings.SMS_HELP_REPLY
    assert twilio.messages[0].to == "+15557770006"


# --- delivery status ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_status_callbacks_out_of_order_end_on_the_latest_status(worker, api, twilio: FakeTwilio) -> None:
    job = wait_final(
        submit(api, "message", {"channel": "sms", "to": "+15557770007", "text": f"s {uuid.uuid4()}"})["id"]
    )
    assert job.status == "succeeded", job.error
    sid = job.result["delivered"][0]["id"]

    for status in ("delivered", "sent", "queued", "delivered"):  # late and repeated callbacks
        response = twilio_post(STATUS_URL, {"MessageSid": sid, "MessageStatus": status, "AccountSid": "x"})
        assert response.status_code == 204
    assert Delivery.objects.get(provider_id=sid).status == "delivered"
    job.refresh_from_db()
    assert job.result["delivered"][0]["status"] == "delivered"
    assert job.events.filter(type="delivery").count() == 1
    assert twilio_post(STATUS_URL, {"MessageSid": sid, "MessageStatus": "sent"}, sign=False).status_code == 403


@pytest.mark.django_db(transaction=True)
def test_undelivered_after_acceptance_shows_on_the_job_without_changing_its_status(worker, api, twilio) -> None:
    job = wait_final(
        submit(api, "message", {"channel": "sms", "to": "+15557770008", "text": f"u {uuid.uuid4()}"})["id"]
    )
    sid = job.result["delivered"][0]["id"]
    response = twilio_post(STATUS_URL, {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30003"})
    assert response.status_code == 204

    body = api.get(f"/api/jobs/{job.pk}/").json()
    assert body["status"] == "succeeded"
    assert (
        body["result"]["delivered"][0] | {"status": "undelivered", "error_code": "30003"}
        == body["result"]["delivered"][0]
    )
    assert body["result"]["undelivered"] == [0]
    events = api.get(f"/api/jobs/{job.pk}/events/").json()
    assert any(e["type"] == "delivery" and e["data"]["failed"] for e in events)


# --- email and Discord in -----------------------------------------------------------------------


def signed_email(raw: bytes) -> dict[str, str]:
    digest = hmac.new(settings.EMAIL_WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return {"HTTP_X_CONVEYOR_SIGNATURE": "sha256=" + digest}


@pytest.mark.django_db(transaction=True)
def test_an_inbound_email_is_answered_in_its_thread(worker, llm: FakeLLM, smtp: SmtpSink) -> None:
    llm.script.tokens = ["Thanks, ", "on it."]
    email = EmailMessage()
    email["From"], email["To"], email["Subject"] = "Dana <dana@example.test>", "help@example.test", "Broken build"
    email["Message-ID"] = "<first.1@mail.example.test>"
    email.set_content("The build is broken.")
    raw = email.as_bytes()
    response = Client().post("/webhooks/email/", raw, content_type="message/rfc822", **signed_email(raw))

    assert response.status_code == 202
    inbound = answered(Message.objects.get(external_id="<first.1@mail.example.test>").pk)
    assert inbound.status == "answered", inbound.error
    (reply,) = smtp.messages()
    assert reply["To"] == "dana@example.test"
    assert reply["Subject"] == "Re: Broken build"
    assert reply["In-Reply-To"] == "<first.1@mail.example.test>"
    assert "<first.1@mail.example.test>" in reply["References"]
    assert reply.get_body(("plain",)).get_content().strip() == "Thanks, on it."

    # the answer to our reply lands in the same conversation, threaded by In-Reply-To
    again = EmailMessage()
    again["From"], again["To"], again["Subject"] = "dana@example.test", "other@example.test", "Re: Re: Broken build"
    again["Message-ID"], again["In-Reply-To"] = "<second.2@mail.example.test>", reply["Message-ID"]
    again.set_content("Any news?")
    raw = again.as_bytes()
    assert Client().post("/webhooks/email/", raw, content_type="message/rfc822", **signed_email(raw)).status_code == 202
    second = Message.objects.get(external_id="<second.2@mail.example.test>")
    assert second.conversation_id == inbound.conversation_id


@pytest.mark.django_db(transaction=True)
def test_a_discord_mention_is_answered_in_its_channel(worker, llm: FakeLLM, discord_api: FakeDiscord) -> None:
    llm.script.tokens = ["pong"]
    bot, channel = 111111111111111111, 222222222222222222 + uuid.uuid4().int % 10**9
    not_for_us = discord_inbound(bot_id=bot, author_id=5, author_is_bot=False, channel_id=channel, is_dm=False,
                                 mentioned_ids=[], content="chatter", message_id=1)  # fmt: skip
    from_a_bot = discord_inbound(bot_id=bot, author_id=6, author_is_bot=True, channel_id=channel, is_dm=True,
                                 mentioned_ids=[], content="beep", message_id=2)  # fmt: skip
    message = discord_inbound(bot_id=bot, author_id=5, author_is_bot=False, channel_id=channel, is_dm=False,
                              mentioned_ids=[bot], content=f"<@{bot}> ping", message_id=3)  # fmt: skip

    assert not_for_us is None
    assert from_a_bot is None
    assert message.text == "ping"
    assert answered(message.pk).status == "answered"
    posted = [m for m in discord_api.messages if m.channel_id == str(channel) or m.webhook_id]
    assert posted[-1].content == "pong"
    assert posted[-1].allowed_mentions == {"parse": []}


@pytest.mark.django_db(transaction=True)
def test_a_failed_step_keeps_the_message_and_replaying_the_job_continues(worker, llm, twilio, api) -> None:
    llm.script.failures = [(400, {}, "bad request")]  # the provider refuses: the AI job fails for good
    params = inbound_sms("+15557770009", "are you there?")
    assert twilio_post(SMS_URL, params).status_code == 200
    inbound = answered(Message.objects.get(external_id=params["MessageSid"]).pk)

    assert inbound.status == "failed"
    assert "ai_generate" in inbound.error
    assert twilio.messages == []
    staff = client_for(make_user(staff=True))
    assert staff.post(f"/api/jobs/{inbound.ai_job_id}/retry/").status_code in (200, 202)
    assert answered(inbound.pk).status in ("answered",) or wait_for(
        lambda: Message.objects.get(pk=inbound.pk).status == "answered", 30
    )
    assert [m.to for m in twilio.messages] == ["+15557770009"]


# --- what strangers send ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_empty_sms_is_kept_unanswered_and_the_conversation_goes_on(worker, llm: FakeLLM, twilio) -> None:
    sender = "+15557770010"
    empty = inbound_sms(sender, "")  # a picture alone (NumMedia 1) has no Body
    assert twilio_post(SMS_URL, empty).status_code == 200
    stored = Message.objects.get(external_id=empty["MessageSid"])
    assert stored.status == "handled"
    assert stored.error == "no text to answer"
    assert stored.ai_job_id is None

    params = inbound_sms(sender, "hello\x00 there")
    assert twilio_post(SMS_URL, params).status_code == 200
    answered_message = answered(Message.objects.get(external_id=params["MessageSid"]).pk)
    assert answered_message.status == "answered", answered_message.error
    assert answered_message.text == "hello\ufffd there"  # a NUL cannot be stored: replaced
    assert [m.to for m in twilio.messages] == [sender]


def post_email(raw: bytes, **headers: str) -> object:
    return Client().post("/webhooks/email/", raw, content_type="message/rfc822", **(headers or signed_email(raw)))


@pytest.mark.django_db
def test_hostile_emails_get_a_4xx_never_a_500(settings) -> None:
    settings.EMAIL_INBOUND_MAX_BYTES = 10_000
    assert post_email(b"x" * 10_001).status_code == 413
    ok = b"From: a@example.test\r\nTo: us@example.test\r\n\r\nhi\r\n"
    assert post_email(ok, HTTP_X_CONVEYOR_SIGNATURE="sha256=é" + "0" * 63).status_code == 403
    assert post_email(b"\x00\xff garbage without headers").status_code == 400  # no sender
    nul = b"From: a@example.test\r\nTo: us@example.test\r\nSubject: a\x00b\r\nMessage-ID: <n@x.test>\r\n\r\nc\x00d\r\n"
    assert post_email(nul).status_code == 202
    stored = Message.objects.get(external_id="<n@x.test>")
    assert (stored.subject, stored.text) == ("a\ufffdb", "c\ufffdd")


@pytest.mark.django_db(transaction=True)
def test_a_line_break_smuggled_into_in_reply_to_never_reaches_our_reply(worker, llm: FakeLLM, smtp: SmtpSink) -> None:
    raw = (
        b"From: eve@example.test\r\nTo: help@example.test\r\nSubject: hi\r\nMessage-ID: <m1@example.test>\r\n"
        b"In-Reply-To: =?utf-8?q?<x@y>=0D=0ABcc:_victim@evil.test?=\r\n\r\nhello\r\n"
    )
    assert post_email(raw).status_code == 202
    assert answered(Message.objects.get(external_id="<m1@example.test>").pk).status == "answered"
    (reply,) = smtp.messages()
    assert [e.rcpt_tos for e in smtp.envelopes] == [["eve@example.test"]]
    assert "victim" not in reply.as_string()
    assert reply["In-Reply-To"] == "<m1@example.test>"


@pytest.mark.django_db
def test_a_flood_from_one_sender_is_kept_but_not_answered(settings) -> None:
    settings.MESSAGE_INBOUND_PER_HOUR = 3
    sender = f"+1555888{uuid.uuid4().int % 10000:04d}"
    for n in range(5):
        assert twilio_post(SMS_URL, inbound_sms(sender, f"message {n}")).status_code == 200

    messages = list(Message.objects.filter(conversation__their_address=sender).order_by("created_at"))
    assert len(messages) == 5  # every one stored
    assert [m.status for m in messages[3:]] == ["handled", "handled"]
    assert all("over 3 messages an hour" in m.error for m in messages[3:])
    assert all(m.status in ("received", "answering") for m in messages[:3])  # queued for an answer
    other = inbound_sms("+15557770099", "hello")  # another sender is not held back
    assert twilio_post(SMS_URL, other).status_code == 200
    assert Message.objects.get(external_id=other["MessageSid"]).status != "handled"
