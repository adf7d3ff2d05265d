"""The `message` kind: a text delivered on Discord, SMS or email (see `tasks.channels.deliver`)."""

from typing import Any

from tasks.channels.deliver import deliver
from tasks.context import Context


def handle(ctx: Context) -> dict[str, Any]:
    return deliver(ctx)
