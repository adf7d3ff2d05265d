"""The live workers, as each announces itself in Redis: every JOBS_HEARTBEAT_SECONDS a worker writes
what it consumes (queues, pool, concurrency, sandbox, jobs running) under a key that lives three
heartbeats (ten seconds at least), and its name in a sorted set by when that key expires. Reading
them is a ZRANGE and an MGET (never a SCAN of the keyspace): health and stats need not broadcast to
every worker and wait for the slowest to answer."""

import json
import time
from typing import Any

from django.conf import settings

from apps.jobs import live

PREFIX = "conveyor:worker:"
NAMES = "conveyor:workers"


def announce(name: str, status: dict[str, Any]) -> None:
    ttl = max(3 * settings.JOBS_HEARTBEAT_SECONDS, 10)
    with live.client().pipeline(transaction=False) as pipe:
        pipe.set(PREFIX + name, json.dumps({**status, "name": name, "at": time.time()}), px=int(ttl * 1000))
        pipe.zadd(NAMES, {name: time.time() + ttl})
        pipe.execute()


def withdraw(name: str) -> None:
    with live.client().pipeline(transaction=False) as pipe:
        pipe.delete(PREFIX + name)
        pipe.zrem(NAMES, name)
        pipe.execute()


def alive(client: Any = None) -> dict[str, dict[str, Any]]:
    """The workers that announced themselves lately (their keys have not expired), by name (in
    REDIS_URL, or the Redis of `client`)."""
    client = client or live.client()
    client.zremrangebyscore(NAMES, "-inf", time.time() - 60)  # long gone (a minute of clock skew allowed)
    names = [n.decode() for n in client.zrange(NAMES, 0, -1)]
    found: dict[str, dict[str, Any]] = {}
    for name, value in zip(names, client.mget([PREFIX + n for n in names]) if names else [], strict=True):
        if value:
            found[name] = json.loads(value)
    return found
