"""`python manage.py run_discord_bot`: the Discord gateway client that turns direct messages and
mentions of the bot into inbound messages of conversations (answered like SMS and email). discord.py
reconnects on its own; this command runs until stopped."""

import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.messaging import conversations
from apps.messaging.models import Channel, Message

log = logging.getLogger(__name__)


def inbound(*, bot_id: int, author_id: int, author_is_bot: bool, channel_id: int, is_dm: bool,
            mentioned_ids: list[int], content: str, message_id: int) -> Message | None:  # fmt: skip
    """What the bot does with a message it sees: a DM or a mention of it from a person becomes an
    inbound message of the conversation in that channel (replies go back to the channel). Whether
    stored (None: not for us, or seen already)."""
    if author_is_bot or author_id == bot_id or not (is_dm or bot_id in mentioned_ids):
        return None
    text = content.replace(f"<@{bot_id}>", "").replace(f"<@!{bot_id}>", "").strip()
    if not text:
        return None
    return conversations.receive(
        Channel.DISCORD, our_address=str(bot_id), their_address=str(channel_id), text=text, external_id=str(message_id)
    )


def make_client() -> Any:
    import discord

    intents = discord.Intents.default()
    intents.message_content = True  # privileged: enable it for the bot in Discord's developer portal
    intents.dm_messages = True
    client = discord.Client(intents=intents, allowed_mentions=discord.AllowedMentions.none())
    store = sync_to_async(inbound, thread_sensitive=True)

    @client.event
    async def on_ready() -> None:
        log.info("discord bot connected as %s (%s)", client.user, client.user.id if client.user else "?")

    @client.event
    async def on_message(message: discord.Message) -> None:
        if client.user is None:
            return
        try:
            await store(
                bot_id=client.user.id,
                author_id=message.author.id,
                author_is_bot=message.author.bot,
                channel_id=message.channel.id,
                is_dm=isinstance(message.channel, discord.DMChannel),
                mentioned_ids=[user.id for user in message.mentions],
                content=message.content,
                message_id=message.id,
            )
        except Exception:
            log.exception("inbound Discord message %s could not be stored", message.id)

    return client


class Command(BaseCommand):
    help = "Run the Discord bot that turns DMs and mentions into conversations (needs DISCORD_BOT_TOKEN)."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DISCORD_BOT_TOKEN:
            raise CommandError("DISCORD_BOT_TOKEN is not set")
        if settings.DISCORD_API_BASE_URL:
            import discord

            discord.http.Route.BASE = settings.DISCORD_API_BASE_URL
        make_client().run(settings.DISCORD_BOT_TOKEN, log_handler=None, reconnect=True)
