"""The fake Twilio and Discord servers, driven by the real client libraries: the seams the app uses
(a rewriting `TwilioHttpClient`, `discord.http.Route.BASE`) reach them and get answers the libraries
accept."""

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import discord
import pytest
import requests
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from tests.fake_discord import FakeDiscord
from tests.fake_twilio import DEFAULT_ACCOUNT_SID, FakeTwilio, signature

CHANNEL = "111111111111111111"


class _RewritingClient(TwilioHttpClient):
    """Sends every request to `base` (scheme and host replaced), as the app's seam does."""

    def __init__(self, base: str) -> None:
        super().__init__(timeout=5)
        self.base = urllib.parse.urlsplit(base)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        parts = urllib.parse.urlsplit(url)._replace(scheme=self.base.scheme, netloc=self.base.netloc)
        return super().request(method, urllib.parse.urlunsplit(parts), *args, **kwargs)


@pytest.fixture
def twilio_fake() -> Iterator[FakeTwilio]:
    fake = FakeTwilio().start()
    yield fake
    fake.stop()


@pytest.fixture
def discord_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscord]:
    fake = FakeDiscord(bot_token="bot-token").start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    yield fake
    fake.stop()


def _twilio(fake: FakeTwilio, token: str = "test-token") -> Client:  # noqa: S107
    return Client(fake.account_sid, token, http_client=_RewritingClient(fake.url))


def test_twilio_create_records_the_message(twilio_fake: FakeTwilio) -> None:
    message = _twilio(twilio_fake).messages.create(
        to="+15005550006", from_="+15005550001", body="job done", status_callback="http://127.0.0.1:1/cb"
    )
    assert message.sid.startswith("SM")
    assert len(message.sid) == 34
    assert message.status == "queued"
    assert message.num_segments == "1"
    assert message.direction == "outbound-api"
    (sent,) = twilio_fake.messages
    assert (sent.sid, sent.to, sent.from_, sent.body) == (message.sid, "+15005550006", "+15005550001", "job done")
    assert sent.status_callback == "http://127.0.0.1:1/cb"
    assert twilio_fake.requests[-1].status == 201
    assert _twilio(twilio_fake).messages(message.sid).fetch().body == "job done"


def test_twilio_refusals(twilio_fake: FakeTwilio) -> None:
    with pytest.raises(TwilioRestException) as bad_auth:
        _twilio(twilio_fake, token="wrong").messages.create(to="+15005550006", from_="+15005550001", body="x")
    assert (bad_auth.value.status, bad_auth.value.code) == (401, 20003)

    twilio_fake.invalid_numbers.add("+15005550001")
    with pytest.raises(TwilioRestException) as invalid:
        _twilio(twilio_fake).messages.create(to="+15005550001", from_="+15005550002", body="x")
    assert (invalid.value.status, invalid.value.code) == (400, 21211)

    twilio_fake.fail_next(429, 20429, "Too Many Requests", headers={"Retry-After": "2"})
    with pytest.raises(TwilioRestException) as limited:
        _twilio(twilio_fake).messages.create(to="+15005550006", from_="+15005550002", body="x")
    assert (limited.value.status, limited.value.code) == (429, 20429)
    assert [r.status for r in twilio_fake.requests] == [401, 400, 429]
    assert twilio_fake.messages == []

    twilio_fake.rate_limit_per_second = 2
    client = _twilio(twilio_fake)
    statuses = []
    for _ in range(3):
        try:
            client.messages.create(to="+15005550006", from_="+15005550002", body="x")
            statuses.append(201)
        except TwilioRestException as error:
            statuses.append(error.status)
    assert statuses == [201, 201, 429]


def test_twilio_status_callback_is_signed(twilio_fake: FakeTwilio) -> None:
    received: list[tuple[str, dict[str, str]]] = []

    class Receiver(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append((self.headers["X-Twilio-Signature"], dict(urllib.parse.parse_qsl(raw))))
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        callback = f"http://127.0.0.1:{server.server_address[1]}/hooks/twilio?job=7"
        sid = (
            _twilio(twilio_fake)
            .messages.create(to="+15005550006", from_="+15005550001", body="x", status_callback=callback)
            .sid
        )
        assert twilio_fake.send_status(sid, "undelivered", error_code="30003") == 204
    finally:
        server.shutdown()
        server.server_close()
    ((sent_signature, params),) = received
    assert params["MessageSid"] == sid
    assert params["MessageStatus"] == "undelivered"
    assert params["ErrorCode"] == "30003"
    assert params["AccountSid"] == DEFAULT_ACCOUNT_SID
    assert sent_signature == signature("test-token", callback, params)
    assert RequestValidator("test-token").validate(callback, params, sent_signature)


def test_discord_webhook_send(discord_fake: FakeDiscord) -> None:
    webhook = discord_fake.add_webhook(CHANNEL)
    hook = discord.SyncWebhook.from_url(discord_fake.webhook_url(webhook), session=requests.Session())
    message = hook.send("hi", wait=True, username="Conveyor", allowed_mentions=discord.AllowedMentions.none())
    (posted,) = discord_fake.messages
    assert message.id == int(posted.id)
    assert message.content == "hi"
    assert (posted.channel_id, posted.webhook_id, posted.username) == (CHANNEL, webhook["id"], "Conveyor")
    assert posted.allowed_mentions == {"parse": []}
    assert hook.send("no wait") is None
    assert discord_fake.requests[-1].query["wait"] == "0"
    assert discord_fake.requests[-1].status == 204

    discord_fake.delete_webhook(webhook["id"])
    with pytest.raises(discord.NotFound) as gone:
        hook.send("hi", wait=True)
    assert gone.value.code == 10015


def test_discord_bot_send_and_webhooks(discord_fake: FakeDiscord) -> None:
    discord_fake.known_channels = {CHANNEL}

    async def run() -> None:
        client = discord.Client(intents=discord.Intents.none())
        await client.login("bot-token")
        try:
            assert client.user is not None
            assert client.user.name == "conveyor-bot"
            message = await client.get_partial_messageable(int(CHANNEL)).send("hello")
            assert message.content == "hello"
            with pytest.raises(discord.NotFound) as unknown:
                await client.get_partial_messageable(222222222222222222).send("hello")
            assert unknown.value.code == 10003
            channel = await client.fetch_channel(int(CHANNEL))
            assert isinstance(channel, discord.TextChannel)
            created = await channel.create_webhook(name="Conveyor")
            assert created.token is not None
            assert len(created.token) == 68
            assert [w.id for w in await channel.webhooks()] == [created.id]
            with pytest.raises(discord.HTTPException) as reserved:
                await channel.create_webhook(name="my Discord hook")
            assert (reserved.value.status, reserved.value.code) == (400, 50035)
        finally:
            await client.close()

    asyncio.run(run())
    bot_posts = [m for m in discord_fake.messages if m.webhook_id is None]
    assert [(m.channel_id, m.content, m.authorization) for m in bot_posts] == [(CHANNEL, "hello", "Bot bot-token")]

    async def bad_login() -> None:
        client = discord.Client(intents=discord.Intents.none())
        try:
            await client.login("wrong")
        finally:
            await client.close()

    with pytest.raises(discord.LoginFailure):
        asyncio.run(bad_login())


def test_discord_rate_limits_are_waited_out(discord_fake: FakeDiscord) -> None:
    discord_fake.bucket_limit, discord_fake.bucket_window = 2, 1.0

    async def run() -> None:
        client = discord.Client(intents=discord.Intents.none())
        await client.login("bot-token")
        try:
            channel = client.get_partial_messageable(int(CHANNEL))
            for n in range(3):
                await channel.send(f"m{n}")
        finally:
            await client.close()

    asyncio.run(run())
    assert [m.content for m in discord_fake.messages] == ["m0", "m1", "m2"]
    assert len(discord_fake.rate_limited) <= 1

    discord_fake.reset()  # fresh buckets: the raw answers, header by header
    session = requests.Session()
    auth = {"Authorization": "Bot bot-token"}
    url = f"{discord_fake.api_base}/channels/{CHANNEL}/messages"
    answers = [session.post(url, json={"content": "raw"}, headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["1", "0", "0"]
    bucket = {a.headers["X-RateLimit-Bucket"] for a in answers}
    assert len(bucket) == 1
    assert all(a.headers["Content-Type"] == "application/json" for a in answers)
    over = answers[-1]
    assert over.headers["Via"]
    assert over.headers["X-RateLimit-Scope"] == "user"
    assert over.headers["Retry-After"] == "1"
    assert 0 < over.json()["retry_after"] <= 1.0
    assert over.json()["global"] is False
    assert 0 < float(over.headers["X-RateLimit-Reset"]) - time.time() <= 1.0
    assert discord_fake.rate_limited[-1][:2] == (f"/api/v10/channels/{CHANNEL}/messages", "user")

    # a scripted shared-scope 429 is waited out by discord.py, through the webhook path too
    webhook = discord_fake.add_webhook(CHANNEL)
    discord_fake.bucket_limit = None
    discord_fake.fail_next(429, {"retry_after": 0.2}, headers={"X-RateLimit-Scope": "shared", "Retry-After": "1"})
    started = time.monotonic()
    hook = discord.SyncWebhook.from_url(discord_fake.webhook_url(webhook), session=session)
    assert hook.send("after 429", wait=True).content == "after 429"
    assert time.monotonic() - started >= 0.2
    assert discord_fake.rate_limited[-1][1] == "shared"


def test_discord_global_limit_and_scripted_errors(discord_fake: FakeDiscord) -> None:
    discord_fake.global_limit_per_second = 1
    session = requests.Session()
    auth = {"Authorization": "Bot bot-token"}
    first = session.get(f"{discord_fake.api_base}/users/@me", headers=auth)
    second = session.get(f"{discord_fake.api_base}/users/@me", headers=auth)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.headers["X-RateLimit-Global"] == "true"
    assert json.loads(second.text)["global"] is True
    discord_fake.global_limit_per_second = None

    discord_fake.fail_next(403, {"code": 50013, "message": "Missing Permissions"})
    webhook = discord_fake.add_webhook(CHANNEL)
    hook = discord.SyncWebhook.from_url(discord_fake.webhook_url(webhook), session=session)
    with pytest.raises(discord.Forbidden) as forbidden:
        hook.send("x", wait=True)
    assert forbidden.value.code == 50013
