"""The live workers, as each announces itself in Redis: every JOBS_HEARTBEAT_SECONDS a worker writes
what it consumes (queues, pool, concurrency, sandbox, jobs running) under a key that lives three
heartbeats (ten seconds at least). Reading them is one SCAN and one MGET: health and stats need not broadcast to every
worker and wait for the slowest to answer."""

import json
import time
from typing import Any

from django.conf import settings

from apps.jobs import live

PREFIX = "conveyor:worker:"


def announce(name: str, status: dict[str, Any]) -> None:
    ttl = int(max(3 * settings.JOBS_HEARTBEAT_SECONDS, 10) * 1000)
    live.client().set(PREFIX + name, json.dumps({**status, "name": name, "at": time.time()}), px=ttl)


def withdraw(name: str) -> None:
    live.client().delete(PREFIX + name)


def alive(client: Any = None) -> dict[str, dict[str, Any]]:
    """The workers that announced themselves lately (see PREFIX's TTL), by name (in REDIS_URL, or
    the Redis of `client`)."""
    client = client or live.client()
    keys = sorted(client.scan_iter(match=PREFIX + "*", count=1000))
    found: dict[str, dict[str, Any]] = {}
    for key, value in zip(keys, client.mget(keys) if keys else [], strict=True):
        if value:
            status = json.loads(value)
            found[status.get("name") or key.decode().removeprefix(PREFIX)] = status
    return found
