"""Discord through discord.py's own HTTP client (REST only: sending needs no gateway).

Each worker process keeps one event loop in a thread of its own, with a logged-in `discord.Client` (for
the bot token) and an aiohttp session (for webhooks); a job's thread hands it one coroutine at a time.
Every answer's `X-RateLimit-*` headers are written to Redis (`tasks.channels.ratelimit.learn`), and every
request first takes its place in that shared bucket, so that workers together keep within a channel's
bucket that discord.py alone would only keep per process; a global 429 holds every worker. Mentions are
off unless asked for: text written by a model never pings `@everyone` or a role.
"""

import asyncio
import concurrent.futures
import logging
import re
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import discord
from django.conf import settings

from project.processes import per_process
from tasks import interrupts
from tasks.channels import ratelimit
from tasks.channels.common import Sent, inline_wait
from tasks.context import PermanentError, RateLimited, RetryableError

log = logging.getLogger(__name__)
T = TypeVar("T")

GLOBAL = "discord:global"
WEBHOOK_NAME = "Conveyor"  # the webhook the bot makes in a channel; personas speak through it by name
UNKNOWN_WEBHOOK = 10015
NO_WEBHOOKS = (50003, 50013, 50024)
_ROUTE = re.compile(r"/(channels|webhooks)/(\d+)")
_NO_MENTIONS = discord.AllowedMentions.none()


def route_bucket(kind: str, snowflake: str) -> str:
    return f"discord:{kind}:{snowflake}"


async def _on_request_end(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
    """Learn the bucket a request used from its answer's headers (runs on the loop's thread)."""
    headers = params.response.headers
    match = _ROUTE.search(params.url.path)
    try:
        if params.response.status == 429:
            scope = headers.get("X-RateLimit-Scope", "user")
            wait = float(headers.get("Retry-After") or 1)
            log.warning(
                "discord 429 on %s %s (scope %s, retry after %.2fs)", params.method, params.url.path, scope, wait
            )
            if headers.get("X-RateLimit-Global") or scope == "global":
                ratelimit.block(GLOBAL, wait)
                return
            if scope == "shared":  # the resource's limit, shared with others: not ours to learn
                return
        if match and "X-RateLimit-Limit" in headers:
            ratelimit.learn(
                route_bucket(match.group(1), match.group(2)),
                limit=int(headers["X-RateLimit-Limit"]),
                remaining=int(headers.get("X-RateLimit-Remaining", 0)),
                reset_after=float(headers.get("X-RateLimit-Reset-After", 1)),
            )
        elif match:
            ratelimit.unprobe(route_bucket(match.group(1), match.group(2)))
    except Exception:  # a hint lost is a 429 later, never a failed send
        log.exception("could not record Discord's rate-limit headers")


class _Loop:
    """The process's Discord thread: its loop, client and session."""

    def __init__(self) -> None:
        if settings.DISCORD_API_BASE_URL:
            discord.http.Route.BASE = settings.DISCORD_API_BASE_URL  # every URL is built from it
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="discord-http", daemon=True).start()
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(_on_request_end)
        self.client: discord.Client | None = None
        self.session: aiohttp.ClientSession | None = None
        self.lock = asyncio.Lock()

    def run(self, coro: Awaitable[T]) -> T:
        """Run `coro` on the loop; an interruption of the attempt cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            with interrupts.on_interrupt(future.cancel):
                return future.result(timeout=interrupts.time_left(settings.DISCORD_TIMEOUT_SECONDS) + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RetryableError("Discord did not answer in time") from None
        except concurrent.futures.CancelledError:
            interrupts.check()
            raise RetryableError("the Discord request was cancelled") from None

    async def bot(self) -> discord.Client:
        async with self.lock:
            if self.client is None or self.client.http.token != settings.DISCORD_BOT_TOKEN:
                if not settings.DISCORD_BOT_TOKEN:
                    raise PermanentError("Discord is not configured: set DISCORD_BOT_TOKEN")
                client = discord.Client(
                    intents=discord.Intents.none(),
                    http_trace=self.trace,
                    max_ratelimit_timeout=30.0,
                    allowed_mentions=_NO_MENTIONS,
                )
                await client.login(settings.DISCORD_BOT_TOKEN)
                self.client = client
            return self.client

    async def webhook_session(self) -> aiohttp.ClientSession:
        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=settings.DISCORD_TIMEOUT_SECONDS)
            self.session = aiohttp.ClientSession(trace_configs=[self.trace], timeout=timeout)
        return self.session


@per_process
def _loop() -> _Loop:
    return _Loop()


def _wait_for_buckets(bucket: str) -> None:
    """Take a place in the shared buckets: the route's (learned from Discord's answers), then Discord's
    global limit per bot; waiting in the attempt while the wait is short, else putting the job off."""
    limits = [ratelimit.Limit(GLOBAL, settings.DISCORD_RATE_PER_SECOND, max(1, int(settings.DISCORD_RATE_PER_SECOND)))]
    while wait := ratelimit.reserve(bucket, GLOBAL):
        if wait > inline_wait():
            raise RateLimited(f"Discord's rate limit for this route: next slot in {wait:.1f}s", retry_after=wait)
        interrupts.sleep(wait)
    if wait := ratelimit.acquire(limits, max_wait=inline_wait(), sleep=interrupts.sleep):
        raise RateLimited(f"Discord's global rate limit: next slot in {wait:.1f}s", retry_after=wait)


def _error(exc: BaseException) -> Exception:
    if isinstance(exc, discord.RateLimited):
        return RateLimited(f"Discord rate limit: retry after {exc.retry_after:.1f}s", retry_after=exc.retry_after)
    if isinstance(exc, discord.LoginFailure):
        return PermanentError("Discord refused the bot token (401)")
    if isinstance(exc, discord.HTTPException):
        text = exc.text or exc.response.reason or ""
        message = f"Discord refused the message: {exc.status} {text}" + (f" (code {exc.code})" if exc.code else "")
        if exc.status == 429:  # not retried by discord.py: no Via header, a Cloudflare ban
            return RateLimited(message, retry_after=60.0)
        if isinstance(exc, discord.DiscordServerError) or exc.status >= 500:
            return RetryableError(message)
        return PermanentError(message)
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return RetryableError(f"Discord did not answer: {type(exc).__name__}")
    return exc if isinstance(exc, Exception) else RetryableError(str(exc))


def _call(bucket: str, coro_factory: Any) -> Any:
    _wait_for_buckets(bucket)
    try:
        return _loop().run(coro_factory())
    except (TimeoutError, discord.DiscordException, aiohttp.ClientError) as exc:
        raise _error(exc) from None


def send_to_channel(channel_id: str, text: str) -> Sent:
    """A message from the bot to a channel (or a DM channel) by id."""
    loop = _loop()

    async def send() -> discord.Message:
        client = await loop.bot()
        return await client.get_partial_messageable(int(channel_id)).send(text, allowed_mentions=_NO_MENTIONS)

    message = _call(route_bucket("channels", channel_id), send)
    return Sent(str(message.id), "sent")


def send_to_webhook(webhook_id: str, token: str, text: str, *, username: str = "", avatar_url: str = "") -> Sent:
    """A message through a webhook, under a persona's name and avatar. Raises UnknownWebhook when Discord
    no longer has it."""
    loop = _loop()

    async def send() -> discord.WebhookMessage:
        session = await loop.webhook_session()
        webhook = discord.Webhook.partial(int(webhook_id), token, session=session)
        options: dict[str, Any] = {"wait": True, "allowed_mentions": _NO_MENTIONS}
        if username:
            options["username"] = username
        if avatar_url:
            options["avatar_url"] = avatar_url
        return await webhook.send(text, **options)

    try:
        message = _call(route_bucket("webhooks", webhook_id), send)
    except PermanentError as exc:
        if f"(code {UNKNOWN_WEBHOOK})" in str(exc):
            raise UnknownWebhook(str(exc)) from None
        raise
    return Sent(str(message.id), "sent")


class UnknownWebhook(PermanentError):
    """Discord deleted the webhook (10015): make it again."""


def find_or_create_webhook(channel_id: str) -> tuple[str, str]:
    """The channel's webhook that our bot made (one it finds, else a new one): (id, token)."""
    loop = _loop()

    async def find_or_create() -> dict:
        client = await loop.bot()
        me = client.user.id if client.user else None
        for hook in await client.http.channel_webhooks(channel_id):
            if hook.get("token") and hook.get("name") == WEBHOOK_NAME and (hook.get("user") or {}).get("id") == str(me):
                return hook
        return await client.http.create_webhook(channel_id, name=WEBHOOK_NAME)

    try:
        hook = _call(route_bucket("channels", channel_id), find_or_create)
    except PermanentError as exc:
        if any(f"(code {code})" in str(exc) for code in NO_WEBHOOKS):
            raise NoWebhooksHere(str(exc)) from None
        raise
    return str(hook["id"]), str(hook["token"])


class NoWebhooksHere(PermanentError):
    """The channel takes no webhooks of ours: a DM (50003), a thread (50024), or the bot lacks Manage
    Webhooks there (50013)."""


WEBHOOK_URL = re.compile(r"discord(?:app)?\.com/api/webhooks/(?P<id>[0-9]{17,20})/(?P<token>[A-Za-z0-9\.\-\_]{60,})")


def parse_webhook_url(url: str) -> tuple[str, str]:
    match = WEBHOOK_URL.search(url)
    if not match:
        raise PermanentError("not a Discord webhook URL")
    return match.group("id"), match.group("token")
