"""A real local HTTP server that speaks the part of Discord's REST API that discord.py uses to log a
bot in, post to channels and run webhooks, for the tests and the notification benchmarks. The app
reaches it by setting `discord.http.Route.BASE` to `api_base`.

It runs an aiohttp server on an event loop of its own, in a daemon thread. It records every request
in `requests`, each message posted in `messages` and each 429 in `rate_limited`, and answers as
Discord does: per-route buckets (`bucket_limit` per `bucket_window` seconds, counted per channel or
webhook) with the X-RateLimit-* headers, a global limit (`global_limit_per_second`), unknown
channels (`known_channels`) and webhooks, and failures queued with `fail_next`.

discord.py is strict about what it reads: JSON must come with Content-Type exactly
`application/json` (no charset), and a 429 without a `Via` header is taken for a Cloudflare ban.
"""

import asyncio
import hashlib
import json
import math
import re
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000
_TOKEN_ALPHABET = string.ascii_letters + string.digits + "_-"
_VIA = "1.1 google"


@dataclass
class DiscordRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: dict[str, Any] | list[Any] | None
    at: float = field(default_factory=time.time)
    status: int = 0  # the HTTP status answered (0: the client hung up first)
    files: list[str] = field(default_factory=list)  # names of the files of a multipart body


@dataclass
class PostedMessage:
    id: str
    channel_id: str
    webhook_id: str | None
    content: str
    username: str | None
    avatar_url: str | None
    allowed_mentions: dict[str, Any] | None
    authorization: str | None
    at: float = field(default_factory=time.time)
    embeds: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    key: str  # the route's template, as Discord buckets it
    bot: bool  # needs `Authorization: Bot <token>`
    handler: Callable[["_Call"], Awaitable[tuple[int, Any]]]


@dataclass
class _Call:
    request: web.Request
    record: DiscordRequest
    params: dict[str, str]
    body: dict[str, Any]
    files: list[tuple[str, int, str]]  # (filename, size, content type)


class _Answer(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, code: int, message: str) -> _Answer:
    return _Answer(status, {"code": code, "message": message})


class FakeDiscord:
    def __init__(
        self,
        bot_token: str = "bot-token",  # noqa: S107 (the fake's own)
        known_channels: set[str] | None = None,
        *,
        bucket_limit: int | None = None,
        bucket_window: float = 5.0,
        global_limit_per_second: float | None = None,
    ) -> None:
        self.bot_token = bot_token
        self.known_channels = known_channels
        self.bucket_limit = bucket_limit
        self.bucket_window = bucket_window
        self.global_limit_per_second = global_limit_per_second
        self.requests: list[DiscordRequest] = []
        self.messages: list[PostedMessage] = []
        self.rate_limited: list[tuple[str, str, float]] = []  # (path, scope, at) of each 429 answered
        self.webhooks: dict[str, dict[str, Any]] = {}  # id -> webhook JSON (token included)
        self.failures: list[_Failure] = []
        self.lock = threading.Lock()
        self._sequence = 0
        self.guild_id = self.snowflake()
        self.application_id = self.snowflake()
        self.bot_user: dict[str, Any] = {
            "id": self.application_id,
            "username": "conveyor-bot",
            "discriminator": "0000",
            "avatar": None,
            "bot": True,
            "global_name": None,
            "flags": 0,
        }
        self.owner: dict[str, Any] = {
            "id": self.snowflake(),
            "username": "conveyor-owner",
            "discriminator": "0000",
            "avatar": None,
            "global_name": None,
        }
        self._buckets: dict[tuple[str, str], list[float]] = {}  # (route, major id) -> [window start, count]
        self._global: deque[float] = deque()  # monotonic times of the requests let through
        self._routes = self._route_table()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base(self) -> str:
        """The value for `discord.http.Route.BASE`."""
        return self.url + API_PREFIX

    def start(self) -> "FakeDiscord":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Discord did not start")
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.thread.join(10)
        self._loop.close()

    def reset(self) -> None:
        """Forget the requests, messages, rate-limit counts and queued failures (webhooks stay)."""
        with self.lock:
            self.requests.clear()
            self.messages.clear()
            self.rate_limited.clear()
            self.failures.clear()
            self._buckets.clear()
            self._global.clear()

    def snowflake(self) -> str:
        """A fresh Discord ID: milliseconds since the Discord epoch, and a sequence number."""
        with self.lock:
            self._sequence = (self._sequence + 1) % 4096
            return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (1 << 17) | self._sequence)

    def fail_next(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None, times: int = 1
    ) -> None:
        """The next `times` requests get this answer. A 429 gets `Via` and, if missing from `body`, the
        usual message, `retry_after` (from a `Retry-After` header, else 1) and `global` false."""
        headers = dict(headers or {})
        if status == 429:
            headers.setdefault("Via", _VIA)
            retry = float(headers.get("Retry-After", 1))
            body = {"message": "You are being rate limited.", "retry_after": retry, "global": False, **body}
        with self.lock:
            self.failures.extend(_Failure(status, body, headers) for _ in range(times))

    def add_webhook(
        self, channel_id: str, webhook_id: str | None = None, token: str | None = None, name: str = "Conveyor"
    ) -> dict[str, Any]:
        """A webhook on `channel_id`, as if made with `POST /channels/{channel_id}/webhooks`; its JSON."""
        webhook = {
            "id": webhook_id or self.snowflake(),
            "type": 1,
            "token": token or "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(68)),
            "channel_id": str(channel_id),
            "guild_id": self.guild_id,
            "name": name,
            "avatar": None,
            "application_id": self.application_id,
            "user": dict(self.bot_user),
        }
        with self.lock:
            self.webhooks[webhook["id"]] = webhook
        return dict(webhook)

    def delete_webhook(self, webhook_id: str) -> None:
        """Later executions of the webhook answer 404 Unknown Webhook."""
        with self.lock:
            self.webhooks.pop(str(webhook_id), None)

    def webhook_url(self, webhook: dict[str, Any]) -> str:
        """The URL Discord shows for `webhook` (`SyncWebhook.from_url` parses it; requests go to `api_base`)."""
        return f"https://discord.com/api/webhooks/{webhook['id']}/{webhook['token']}"

    # the server

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self._port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    def _route_table(self) -> list[_Route]:
        def route(
            method: str, template: str, bot: bool, handler: Callable[[_Call], Awaitable[tuple[int, Any]]]
        ) -> _Route:
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(API_PREFIX + template))
            return _Route(method, re.compile(pattern + "$"), f"{method} {template}", bot, handler)

        return [
            route("GET", "/users/@me", True, self._me),
            route("GET", "/oauth2/applications/@me", True, self._application),
            route("GET", "/channels/{channel_id}", True, self._channel),
            route("POST", "/channels/{channel_id}/messages", True, self._post_message),
            route("GET", "/channels/{channel_id}/webhooks", True, self._list_webhooks),
            route("POST", "/channels/{channel_id}/webhooks", True, self._create_webhook),
            route("GET", "/webhooks/{webhook_id}", True, self._get_webhook),
            route("DELETE", "/webhooks/{webhook_id}", True, self._delete_webhook),
            route("GET", "/webhooks/{webhook_id}/{webhook_token}", False, self._get_webhook),
            route("DELETE", "/webhooks/{webhook_id}/{webhook_token}", False, self._delete_webhook),
            route("POST", "/webhooks/{webhook_id}/{webhook_token}", False, self._execute_webhook),
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = DiscordRequest(request.method, request.path, dict(request.query), dict(request.headers), None)
        with self.lock:
            self.requests.append(record)
        try:
            body, files = await self._read_body(request)
        except ConnectionError:  # a client that hung up is no news
            return web.Response(status=400)
        except ValueError:
            return self._reply(record, 400, {"code": 50109, "message": "The request body contains invalid JSON."})
        record.json, record.files = body, [name for name, _, _ in files]
        try:
            status, data, headers = await self._dispatch(request, record, body if isinstance(body, dict) else {}, files)
        except _Answer as answer:
            status, data, headers = answer.status, answer.body, answer.headers
        return self._reply(record, status, data, headers)

    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, int, str]]]:
        if not request.can_read_body:
            return None, []
        if request.content_type == "multipart/form-data":
            form = await request.post()
            files: list[tuple[str, int, str]] = []
            payload: Any = None
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    files.append((value.filename, len(value.file.read()), value.content_type))
                elif name == "payload_json":
                    payload = json.loads(value)
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), []

    async def _dispatch(
        self, request: web.Request, record: DiscordRequest, body: dict[str, Any], files: list[tuple[str, int, str]]
    ) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure:
            if failure.status == 429:
                self._count_429(record.path, failure.headers.get("X-RateLimit-Scope", "user"))
            return failure.status, failure.body, failure.headers
        for route in self._routes:
            match = route.pattern.match(request.path)
            if match and route.method == request.method:
                break
        else:
            raise _error(404, 0, "404: Not Found")
        params = match.groupdict()
        if route.bot and request.headers.get("Authorization") != f"Bot {self.bot_token}":
            raise _error(401, 0, "401: Unauthorized")
        self._check_global(record.path)
        if (
            "channel_id" in params
            and self.known_channels is not None
            and params["channel_id"] not in self.known_channels
        ):
            raise _error(404, 10003, "Unknown Channel")
        if "webhook_id" in params:
            with self.lock:
                webhook = self.webhooks.get(params["webhook_id"])
            if webhook is None:
                raise _error(404, 10015, "Unknown Webhook")
            if "webhook_token" in params and params["webhook_token"] != webhook["token"]:
                raise _error(401, 50027, "Invalid Webhook Token")
        major = params.get("webhook_id") or params.get("channel_id") or ""
        headers = self._take_bucket(route.key, major, record.path)
        try:
            status, data = await route.handler(_Call(request, record, params, body, files))
        except _Answer as answer:
            answer.headers = {**headers, **answer.headers}
            raise
        return status, data, headers

    def _reply(
        self, record: DiscordRequest, status: int, data: Any, headers: dict[str, str] | None = None
    ) -> web.Response:
        record.status = status
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.Response(
            status=status,
            body=json.dumps(data).encode(),
            headers={**(headers or {}), "Content-Type": "application/json"},
        )

    # rate limits

    def _count_429(self, path: str, scope: str) -> None:
        with self.lock:
            self.rate_limited.append((path, scope, time.time()))

    def _check_global(self, path: str) -> None:
        with self.lock:
            limit = self.global_limit_per_second
            if limit is None:
                return
            now = time.monotonic()
            while self._global and self._global[0] <= now - 1.0:
                self._global.popleft()
            if len(self._global) + 1 <= limit:
                self._global.append(now)
                return
            retry = max(0.001, self._global[0] + 1.0 - now)
        self._count_429(path, "global")
        raise _Answer(
            429,
            {"message": "You are being rate limited.", "retry_after": round(retry, 3), "global": True},
            {
                "Retry-After": str(math.ceil(retry)),
                "X-RateLimit-Global": "true",
                "X-RateLimit-Scope": "global",
                "Via": _VIA,
            },
        )

    def _take_bucket(self, route: str, major: str, path: str) -> dict[str, str]:
        """Count a request against its bucket: its X-RateLimit-* headers, or a 429 when it is over."""
        bucket_hash = hashlib.sha1(route.encode()).hexdigest()[:20]  # noqa: S324 - a name, not a secret
        with self.lock:
            limit, window = self.bucket_limit, self.bucket_window
            if limit is None:
                return {}
            now = time.monotonic()
            bucket = self._buckets.get((route, major))
            if bucket is None or now >= bucket[0] + window:
                bucket = self._buckets[(route, major)] = [now, 0]
            reset_after = max(0.001, bucket[0] + window - now)
            over = bucket[1] >= limit
            if not over:
                bucket[1] += 1
            headers = {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(max(0, limit - int(bucket[1]))),
                "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                "X-RateLimit-Bucket": bucket_hash,
            }
        if not over:
            return headers
        self._count_429(path, "user")
        headers |= {"X-RateLimit-Scope": "user", "Retry-After": str(math.ceil(reset_after)), "Via": _VIA}
        body = {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}
        raise _Answer(429, body, headers)

    # the routes

    async def _me(self, call: _Call) -> tuple[int, Any]:
        return 200, self.bot_user

    async def _application(self, call: _Call) -> tuple[int, Any]:
        return 200, {
            "id": self.application_id,
            "name": "Conveyor",
            "icon": None,
            "description": "",
            "summary": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "verify_key": "x",
            "flags": 0,
            "rpc_origins": [],
            "team": None,
            "bot": self.bot_user,
        }

    async def _channel(self, call: _Call) -> tuple[int, Any]:
        channel_id = call.params["channel_id"]
        return 200, {
            "id": channel_id,
            "type": 0,
            "guild_id": self.guild_id,
            "name": f"channel-{channel_id}",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }

    async def _post_message(self, call: _Call) -> tuple[int, Any]:
        message = self._message(call, call.params["channel_id"], None, author=self.bot_user)
        return 200, message

    async def _list_webhooks(self, call: _Call) -> tuple[int, Any]:
        with self.lock:
            hooks = [dict(w) for w in self.webhooks.values() if w["channel_id"] == call.params["channel_id"]]
        return 200, hooks

    async def _create_webhook(self, call: _Call) -> tuple[int, Any]:
        name = call.body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 80 or _reserved(name):
            raise _error(400, 50035, "Invalid Form Body")
        return 200, self.add_webhook(call.params["channel_id"], name=name)

    async def _get_webhook(self, call: _Call) -> tuple[int, Any]:
        with self.lock:
            webhook = dict(self.webhooks[call.params["webhook_id"]])
        if "webhook_token" in call.params:
            webhook.pop("user", None)  # fetched by token: no user, as Discord answers
        return 200, webhook

    async def _delete_webhook(self, call: _Call) -> tuple[int, Any]:
        self.delete_webhook(call.params["webhook_id"])
        return 204, None

    async def _execute_webhook(self, call: _Call) -> tuple[int, Any]:
        with self.lock:
            webhook = dict(self.webhooks[call.params["webhook_id"]])
        username = call.body.get("username")
        if username is not None and (not 1 <= len(username) <= 80 or _reserved(username)):
            raise _error(400, 50035, "Invalid Form Body")
        author = {
            "id": webhook["id"],
            "username": username or webhook["name"],
            "discriminator": "0000",
            "avatar": None,
            "bot": True,
            "global_name": None,
        }
        message = self._message(call, webhook["channel_id"], webhook["id"], author=author)
        return (200, message) if call.request.query.get("wait") in ("1", "true", "True") else (204, None)

    def _message(
        self, call: _Call, channel_id: str, webhook_id: str | None, *, author: dict[str, Any]
    ) -> dict[str, Any]:
        """Validate a message's body, record it, and answer its JSON."""
        body = call.body
        content = body.get("content") or ""
        embeds = body.get("embeds") or []
        if not isinstance(content, str) or len(content) > 2000:
            raise _error(400, 50035, "Invalid Form Body")
        if not content and not embeds and not call.files and not body.get("components"):
            raise _error(400, 50006, "Cannot send an empty message")
        allowed = body.get("allowed_mentions")
        message_id = self.snowflake()
        attachments = [
            {
                "id": self.snowflake(),
                "filename": name,
                "size": size,
                "content_type": content_type,
                "url": f"https://cdn.discordapp.com/attachments/{channel_id}/{message_id}/{name}",
                "proxy_url": f"https://media.discordapp.net/attachments/{channel_id}/{message_id}/{name}",
            }
            for name, size, content_type in call.files
        ]
        everyone_allowed = allowed is None or "everyone" in (allowed.get("parse") or [])
        message: dict[str, Any] = {
            "id": message_id,
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts", False)),
            "mention_everyone": everyone_allowed and ("@everyone" in content or "@here" in content),
            "mentions": [],
            "mention_roles": [],
            "attachments": attachments,
            "embeds": embeds,
            "pinned": False,
            "type": 0,
            "flags": int(body.get("flags") or 0),
            "components": [],
        }
        if webhook_id is not None:
            message["webhook_id"] = webhook_id
        posted = PostedMessage(
            id=message_id,
            channel_id=channel_id,
            webhook_id=webhook_id,
            content=content,
            username=body.get("username"),
            avatar_url=body.get("avatar_url"),
            allowed_mentions=allowed,
            authorization=call.request.headers.get("Authorization"),
            embeds=embeds,
            files=[name for name, _, _ in call.files],
        )
        with self.lock:
            self.messages.append(posted)
        return message


def _reserved(name: str) -> bool:
    """Discord refuses webhook names (and usernames) that contain these."""
    return "discord" in name.lower() or "clyde" in name.lower()


if __name__ == "__main__":  # a Discord of its own process, for benchmarks: python -m tests.fake_discord
    fake = FakeDiscord().start()
    print(fake.url, flush=True)
    fake.thread.join()
