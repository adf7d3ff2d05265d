"""Rate limits shared by every worker, held in Redis: per channel, per destination, per sender.

Each limit is a GCRA ("generic cell rate algorithm", the leaky bucket as a meter): one Redis key holds
the theoretical arrival time of the next request, on Redis's own clock (no worker's clock decides).
A request that must pass several limits at once (Twilio's rate for our number, and the destination's)
is admitted by one script that checks them all and takes from all, or from none: two workers never
both get the last slot, and a refused request uses nothing.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings

from project.processes import per_process

PREFIX = "conveyor:rate:"

# KEYS: one per limit. ARGV: for each, the seconds between requests and the burst allowed.
# Returns the seconds to wait before trying again (as a string: Lua numbers lose their fraction), or
# "0" when admitted.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local wait = 0
local next_times = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local early = tat - now - interval * (burst - 1)
  if early > wait then wait = early end
  next_times[i] = tat + interval
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local ttl = math.ceil((next_times[i] - now) * 1000) + 1000
  redis.call('SET', key, tostring(next_times[i]), 'PX', ttl)
end
return '0'
"""


@dataclass(frozen=True)
class Limit:
    """At most `per_second` requests a second on `scope` (e.g. "sms:from:+15550001"), with bursts of
    up to `burst` at once."""

    scope: str
    per_second: float
    burst: int = 1


@per_process
def _script() -> object:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5).register_script(_GCRA)


def try_acquire(limits: Sequence[Limit]) -> float:
    """Take one request from every limit if all allow it now; else take nothing and return how many
    seconds to wait before the next try."""
    if not limits:
        return 0.0
    keys = [PREFIX + limit.scope for limit in limits]
    args: list[float] = []
    for limit in limits:
        args += [1 / limit.per_second, max(1, limit.burst)]
    return float(_script()(keys=keys, args=args))


def acquire(limits: Sequence[Limit], *, max_wait: float, sleep=time.sleep) -> float:
    """Wait for a slot on every limit, at most `max_wait` seconds in all. Returns 0 once admitted, or
    the wait still needed when it would pass `max_wait` (the caller hands the job back to try later,
    rather than hold a worker)."""
    deadline = time.monotonic() + max_wait
    while True:
        wait = try_acquire(limits)
        if wait <= 0:
            return 0.0
        if time.monotonic() + wait > deadline:
            return wait
        sleep(wait)
