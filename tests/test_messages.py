"""Outgoing `message` jobs through a real worker to real local servers: a fake Twilio, a fake Discord
(REST, with rate-limit headers) and an SMTP server (aiosmtpd)."""

import uuid

import pytest

from apps.jobs.models import Job, JobEvent
from apps.messaging.models import Delivery, DiscordWebhook, OptOut
from tests.conftest import SmtpSink, wait_final, wait_for
from tests.factories import submit
from tests.fake_discord import FakeDiscord
from tests.fake_twilio import FakeTwilio

pytestmark = pytest.mark.django_db(transaction=True)

CHANNEL = "123456789012345678"


def unique(text: str) -> str:
    """A text no other test sends (a text sent twice to one destination within a minute goes once)."""
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def send(api: object, **payload: object) -> Job:
    job = submit(api, "message", payload)
    return wait_final(job["id"], timeout=30)


def paragraphs(count: int, size: int) -> str:
    return "\n\n".join((f"Paragraph {n}. " + "word " * ((size - 20) // 5)).rstrip() for n in range(count))


# --- Discord ------------------------------------------------------------------------------------


def test_a_long_discord_text_arrives_in_three_parts_at_boundaries_in_order(api, worker, discord_api: FakeDiscord):
    text = unique(paragraphs(9, 500))  # about 4,500 characters
    assert 4_300 < len(text) < 4_700
    job = send(api, channel="discord", to=CHANNEL, text=text)

    assert job.status == "succeeded", job.error
    posted = [m for m in discord_api.messages if m.channel_id == CHANNEL]
    assert len(posted) == 3
    assert all(len(m.content) <= 2000 for m in posted)
    assert "\n\n".join(m.content for m in posted) == text  # cut only where paragraphs end
    assert all(m.authorization == "Bot bot-token" for m in posted)
    assert all(m.allowed_mentions == {"parse": []} for m in posted)  # no @everyone from a model's text
    assert job.result["parts"] == 3
    assert [d["id"] for d in job.result["delivered"]] == [m.id for m in posted]
    assert [d["part"] for d in job.result["delivered"]] == [0, 1, 2]


def test_a_long_code_block_is_closed_and_reopened_with_its_language(api, worker, discord_api: FakeDiscord):
    code = "\n".join(f"print({n})  # line {n} of a long listing" for n in range(120))
    text = unique("Here is the script:\n\n```python\n" + code + "\n```\nDone.")
    job = send(api, channel="discord", to=CHANNEL, text=text)

    assert job.status == "succeeded", job.error
    posted = [m.content for m in discord_api.messages]
    assert len(posted) >= 3
    for part in posted:
        assert part.count("```") % 2 == 0, part[-200:]  # every fence opened in a part is closed in it
    for part in posted[1:-1]:
        assert part.startswith("```python\n")


def test_an_unknown_channel_fails_at_once_with_discords_message(api, worker, discord_api: FakeDiscord):
    discord_api.known_channels = {CHANNEL}
    job = send(api, channel="discord", to="999999999999999999", text=unique("hello"))

    assert job.status == "failed"
    assert job.attempts == 1
    assert "10003" in job.error["message"]
    assert "Unknown Channel" in job.error["message"]


def test_a_persona_speaks_through_the_channels_webhook_made_once_and_again_if_deleted(
    api, worker, discord_api: FakeDiscord
):
    channel = str(700000000000000000 + uuid.uuid4().int % 10**15)
    first = send(api, channel="discord", to=channel, text=unique("one"), persona="assistant")
    second = send(api, channel="discord", to=channel, text=unique("two"), persona="assistant")

    assert first.status == second.status == "succeeded", (first.error, second.error)
    made = [r for r in discord_api.requests if r.method == "POST" and r.path.endswith(f"/channels/{channel}/webhooks")]
    assert len(made) == 1
    hook = DiscordWebhook.objects.get(channel_id=channel)
    posted = [m for m in discord_api.messages if m.webhook_id == hook.webhook_id]
    assert [m.username for m in posted] == ["assistant", "assistant"]
    assert all(m.allowed_mentions == {"parse": []} for m in posted)
    assert "token" not in str(hook)
    assert hook.token not in {m.authorization for m in posted}

    discord_api.delete_webhook(hook.webhook_id)
    third = send(api, channel="discord", to=channel, text=unique("three"), persona="assistant")
    assert third.status == "succeeded", third.error
    renewed = DiscordWebhook.objects.get(channel_id=channel)
    assert renewed.webhook_id != hook.webhook_id
    assert discord_api.messages[-1].webhook_id == renewed.webhook_id


def test_a_webhook_url_is_sent_to_with_the_personas_name(api, worker, discord_api: FakeDiscord):
    hook = discord_api.add_webhook(CHANNEL)
    job = send(api, channel="discord", webhook_url=discord_api.webhook_url(hook), text=unique("hi"), persona="reviewer")

    assert job.status == "succeeded", job.error
    (posted,) = [m for m in discord_api.messages if m.webhook_id == hook["id"]]
    assert posted.username == "reviewer"
    assert job.result["delivered"][0]["id"] == posted.id
    assert hook["token"] not in Delivery.objects.get(job=job).to  # the token is never the destination
    shown = api.get(f"/api/jobs/{job.pk}/").content.decode()
    assert hook["token"] not in shown  # a secret: whoever has it may post as the webhook
    assert "/api/webhooks/" in shown


def test_a_429_with_retry_after_is_honoured_without_burning_an_attempt(api, worker, discord_api: FakeDiscord):
    # A wait longer than discord.py's max_ratelimit_timeout (30 s) is not slept in the worker: the job
    # is put off for it (the test settings cap any delay at JOBS_RETRY_MAX_SECONDS, 1 s).
    discord_api.fail_next(429, {"message": "slow down", "retry_after": 31.0, "global": False},
                          headers={"Retry-After": "31", "X-RateLimit-Scope": "user"})  # fmt: skip
    job = send(api, channel="discord", to=CHANNEL, text=unique("patience"))

    assert job.status == "succeeded", job.error
    assert job.attempts == 1
    assert job.deferrals == 1
    deferred = JobEvent.objects.get(job=job, type="deferred")
    assert "retry after 31.0s" in deferred.message
    assert deferred.data["delay_s"] == pytest.approx(1.0, abs=0.01)
    assert "not counted as an attempt" in deferred.message


# --- SMS ----------------------------------------------------------------------------------------


def test_an_sms_arrives_with_from_to_and_body_and_its_sid_is_the_delivered_id(api, worker, twilio: FakeTwilio):
    body = unique("Your build passed")
    job = send(api, channel="sms", to="+15551230001", text=body)

    assert job.status == "succeeded", job.error
    (sms,) = twilio.messages
    assert (sms.from_, sms.to, sms.body) == ("+15550000001", "+15551230001", body)
    assert sms.status_callback == "http://testserver/webhooks/twilio/status/"
    assert job.result["delivered"] == [
        {"id": sms.sid, "part": 0, "status": "queued", "segments": 1, "encoding": "GSM-7"}
    ]


def test_a_ucs2_text_reports_its_segments(api, worker, twilio: FakeTwilio):
    body = unique("Привет! " * 12)  # Cyrillic: UCS-2, 67 characters a segment once concatenated
    job = send(api, channel="sms", to="+15551230002", text=body)

    assert job.status == "succeeded", job.error
    (part,) = job.result["delivered"]
    assert part["encoding"] == "UCS-2"
    assert part["segments"] == -(-len(body) // 67)


def test_an_invalid_number_fails_at_once(api, worker, twilio: FakeTwilio):
    twilio.invalid_numbers.add("+15551230003")
    job = send(api, channel="sms", to="+15551230003", text=unique("hello"))

    assert job.status == "failed"
    assert job.attempts == 1
    assert "21211" in job.error["message"]
    assert "not a valid phone number" in job.error["message"]
    assert job.dead_lettered


def test_a_retry_sends_only_the_parts_not_yet_delivered(api, worker, twilio: FakeTwilio):
    text = unique(paragraphs(3, 1500))  # three SMS of at most 1,600 characters
    twilio.fail_body("Paragraph 1.", 500, 20500, "Internal Server Error")
    job = send(api, channel="sms", to="+15551230004", text=text)

    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    bodies = [m.body for m in twilio.messages]
    assert [b.split(".")[0] for b in bodies] == ["Paragraph 0", "Paragraph 1", "Paragraph 2"]  # each once
    assert [d["id"] for d in job.result["delivered"]] == [m.sid for m in twilio.messages]


def test_two_identical_sends_within_the_window_deliver_once(api, worker, twilio: FakeTwilio):
    body = unique("Deploy finished")
    first = submit(api, "message", {"channel": "sms", "to": "+15551230005", "text": body})
    second = submit(api, "message", {"channel": "sms", "to": "+15551230005", "text": body})
    first, second = wait_final(first["id"]), wait_final(second["id"])

    assert first.status == second.status == "succeeded"
    assert len(twilio.messages) == 1
    results = sorted([first.result, second.result], key=lambda r: "duplicate_of" in r)
    assert results[1]["duplicate_of"] in {str(first.pk), str(second.pk)}
    assert results[1]["delivered"][0]["id"] == twilio.messages[0].sid


def test_an_sms_429_puts_the_job_off_without_an_attempt(api, worker, twilio: FakeTwilio):
    twilio.fail_next(429, 20429, "Too Many Requests", headers={"Retry-After": "1"})
    job = send(api, channel="sms", to="+15551230006", text=unique("later"))

    assert job.status == "succeeded", job.error
    assert (job.attempts, job.deferrals) == (1, 1)
    assert len(twilio.messages) == 1


# --- email --------------------------------------------------------------------------------------


def test_an_email_arrives_with_its_subject_both_bodies_and_our_message_id(api, worker, smtp: SmtpSink):
    text = unique("The nightly build <failed>.\n\nSee https://ci.example.test/7")
    job = send(api, channel="email", to="dev@example.test", subject="Build #7 failed", text=text)

    assert job.status == "succeeded", job.error
    (envelope,) = smtp.envelopes
    assert envelope.rcpt_tos == ["dev@example.test"]
    (message,) = smtp.messages()
    assert message["Subject"] == "Build #7 failed"
    assert message["From"] == "conveyor@example.test"
    assert message["Message-ID"] == job.result["delivered"][0]["id"] == f"<conveyor.{job.pk}@example.test>"
    plain = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert plain.replace("\r\n", "\n").strip() == text
    assert "&lt;failed&gt;" in html
    assert '<a href="https://ci.example.test/7"' in html


# --- the payload --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        ({"channel": "sms", "to": "555-1234", "text": "x"}, "to", "E.164"),
        ({"channel": "email", "to": "not-an-address", "text": "x"}, "to", "email address"),
        (
            {"channel": "email", "to": "a@example.test", "text": "x", "subject": "a\nBcc: x@y.test"},
            "subject",
            "one line",
        ),
        ({"channel": "discord", "to": "general", "text": "x"}, "to", "channel id"),
        (
            {"channel": "discord", "webhook_url": "https://evil.example/api/webhooks/1/x", "text": "x"},
            "webhook_url",
            "webhook",
        ),
        ({"channel": "sms", "to": "+15551234567", "text": "x", "persona": "assistant"}, "persona", "Only for discord"),
        ({"channel": "discord", "to": CHANNEL, "text": "x", "persona": "nobody"}, "persona", "Unknown persona"),
        ({"channel": "sms", "to": "+15551234567", "text": "   "}, "text", "empty"),
        ({"channel": "pigeon", "to": "x", "text": "x"}, "channel", "valid choice"),
    ],
)
def test_a_bad_message_payload_is_refused_naming_the_field(api, payload: dict, field: str, reason: str) -> None:
    errors = submit(api, "message", payload, expect=400)
    assert reason in str(errors["payload"][field])


def test_workers_share_a_channels_bucket_learned_from_discord(api, worker, discord_api: FakeDiscord):
    # Two pool processes send to one channel whose bucket allows 2 messages every 2 s. discord.py alone
    # keeps a bucket per process; the shared one keeps both within it: after the first 429 (while the
    # bucket is still unknown), none.
    discord_api.bucket_limit, discord_api.bucket_window = 2, 2.0
    channel = str(800000000000000000 + uuid.uuid4().int % 10**15)
    payloads = [{"channel": "discord", "to": channel, "text": unique(f"tick {n}")} for n in range(8)]
    jobs = [submit(api, "message", payload) for payload in payloads]
    finished = [wait_final(job["id"], timeout=60) for job in jobs]

    assert [job.status for job in finished] == ["succeeded"] * 8
    posted = sorted(m.at for m in discord_api.messages if m.channel_id == channel)
    assert len(posted) == 8
    limited = sorted(at for path, scope, at in discord_api.rate_limited if channel in path)
    assert len(limited) <= 1 or all(at <= posted[2] for at in limited), limited  # only in the first window
    for first, third in zip(posted, posted[2:], strict=False):
        assert third - first >= 2.0 - 0.05  # never a third message within a window


@pytest.mark.parametrize(("scope", "holds_everyone"), [("global", True), ("shared", False)])
def test_discords_429_scopes_are_told_apart(api, worker, discord_api: FakeDiscord, scope: str, holds_everyone: bool):
    # A global 429 holds every worker's requests for its retry_after; a "shared" one (a resource's
    # limit, shared with others) is only that request's to wait out.
    discord_api.fail_next(
        429,
        {"message": "You are being rate limited.", "retry_after": 1.5, "global": scope == "global"},
        headers={"X-RateLimit-Scope": scope, "Retry-After": "2"}
        | ({"X-RateLimit-Global": "true"} if holds_everyone else {}),
    )
    first = submit(api, "message", {"channel": "discord", "to": CHANNEL, "text": unique("first")})
    (limited_at,) = [at for _, _, at in wait_for(lambda: discord_api.rate_limited, what="the 429")]
    elsewhere = {"channel": "discord", "to": "876543210987654321", "text": unique("other")}
    other = wait_final(submit(api, "message", elsewhere)["id"])
    assert wait_final(first["id"]).status == other.status == "succeeded"

    (sent,) = [m.at for m in discord_api.messages if m.channel_id == "876543210987654321"]
    if holds_everyone:
        assert sent - limited_at >= 1.4
    else:
        assert sent - limited_at < 1.4


def test_a_number_that_opted_out_at_twilio_is_recorded_and_not_tried_again(api, worker, twilio: FakeTwilio):
    twilio.fail_next(400, 21610, "Attempt to send to unsubscribed recipient")
    job = send(api, channel="sms", to="+15551230007", text=unique("hello"))

    assert job.status == "failed"
    assert job.attempts == 1
    assert "21610" in job.error["message"]
    assert OptOut.objects.filter(our_address="+15550000001", their_address="+15551230007").exists()
    again = send(api, channel="sms", to="+15551230007", text=unique("hello again"))
    assert again.status == "failed"
    assert "opted out" in again.error["message"]
    assert len(twilio.requests) == 1  # the second was refused before Twilio was called


def test_a_send_that_another_job_holds_waits_for_it_and_goes_out_if_that_job_gave_up(api, worker, twilio):
    from apps.messaging import ledger

    body = unique("Once")
    twilio.fail_body(body, 400, 21212, "The 'From' number is not a valid phone number")  # the first fails for good
    first = wait_final(submit(api, "message", {"channel": "sms", "to": "+15551230008", "text": body})["id"])
    assert first.status == "failed"
    second = wait_final(submit(api, "message", {"channel": "sms", "to": "+15551230008", "text": body})["id"])

    assert second.status == "succeeded", second.error
    assert "duplicate_of" not in second.result  # the first delivered nothing: the second sent it
    assert [m.body for m in twilio.messages] == [body]
    assert ledger.claim(first.pk, ledger.dedupe_key(first.owner_id, first.payload)) == (second.pk, True)


def test_a_status_that_comes_before_its_part_is_recorded_is_applied_when_it_is(api, user) -> None:
    from apps.messaging import deliveries, ledger
    from tests.factories import make_job

    job = make_job(user, "running", kind="message", payload={"channel": "sms", "to": "+15551230009", "text": "x"})
    assert deliveries.report("SMearly", "sent") is False  # Twilio called back before the worker wrote the part
    ledger.record(job.pk, 0, channel="sms", to="+15551230009", provider_id="SMearly", status="queued", segments=1)
    assert Delivery.objects.get(provider_id="SMearly").status == "sent"


def test_a_persona_where_no_webhook_can_be_made_speaks_as_the_bot(api, worker, discord_api: FakeDiscord):
    # A DM (50003), a thread (50024) or a channel where the bot may not manage webhooks (50013).
    channel = str(600000000000000000 + uuid.uuid4().int % 10**15)
    discord_api.fail_next(403, {"code": 50013, "message": "Missing Permissions"})
    job = send(api, channel="discord", to=channel, text=unique("hi"), persona="assistant")

    assert job.status == "succeeded", job.error
    (posted,) = [m for m in discord_api.messages if m.channel_id == channel]
    assert posted.webhook_id is None
    assert posted.authorization == "Bot bot-token"
    assert not DiscordWebhook.objects.filter(channel_id=channel).exists()
