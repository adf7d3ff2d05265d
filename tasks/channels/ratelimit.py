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

# KEYS: one per limit. ARGV: for each, the seconds between requests and the burst allowed; then the
# longest wait the caller accepts. A request that can have a slot within that wait takes it (the slot
# is its own: it sleeps until then and goes, no race with the others waiting); else nothing is taken.
# Returns "R<seconds>" for a slot taken that many seconds from now, or "W<seconds>" for the wait that
# was refused (as strings: Lua numbers lose their fraction).
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local max_wait = tonumber(ARGV[2 * #KEYS + 1])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  local early = tat - now - interval * (burst - 1)
  if early > wait then wait = early end
end
if wait > max_wait then return 'W' .. tostring(wait) end
local at = now + wait
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tat = tats[i]
  if tat < at then tat = at end
  local next_time = tat + interval
  redis.call('SET', key, tostring(next_time), 'PX', math.ceil((next_time - now) * 1000) + 1000)
end
return 'R' .. tostring(wait)
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


def _take(limits: Sequence[Limit], max_wait: float) -> tuple[bool, float]:
    keys = [PREFIX + limit.scope for limit in limits]
    args: list[float] = []
    for limit in limits:
        args += [1 / limit.per_second, max(1, limit.burst)]
    answer = _script()(keys=keys, args=[*args, max(0.0, max_wait)])
    answer = answer.decode() if isinstance(answer, bytes) else str(answer)
    return answer[0] == "R", float(answer[1:])


def try_acquire(limits: Sequence[Limit]) -> float:
    """Take one request from every limit if all allow it now; else take nothing and return how many
    seconds to wait before the next try."""
    if not limits:
        return 0.0
    taken, wait = _take(limits, 0.0)
    return 0.0 if taken else wait


def acquire(limits: Sequence[Limit], *, max_wait: float, sleep=time.sleep) -> float:
    """Take a slot on every limit within `max_wait` seconds, and sleep until it. Returns 0 once
    admitted; else takes nothing and returns the wait needed (the caller puts the job off rather
    than hold a worker). Slots are taken in order of asking: a request waits its turn, never races."""
    if not limits:
        return 0.0
    taken, wait = _take(limits, max_wait)
    if not taken:
        return wait
    if wait > 0:
        sleep(wait)
    return 0.0


# --- buckets learned from a provider's answers (Discord's X-RateLimit-* headers) -------------------

# A bucket as the provider last described it: `limit` requests a window, `remaining` in the current one,
# which ends at `reset` (on Redis's clock), and the window's length. Workers take from `remaining` before
# they send; each answer corrects it. A bucket not known yet lets one request through to learn it
# (the others wait for its answer: a burst into an unknown bucket is what earns 429s). Once a window
# has passed, the next one is assumed to start now with `limit` (plus a margin, since the provider's
# window may have started a little later).
_RESERVE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then return tostring(blocked / 1000) end
local b = redis.call('HMGET', KEYS[1], 'limit', 'remaining', 'reset', 'window')
if not b[1] then
  -- an unknown bucket: one request goes first and learns it; the others wait for its answer
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', 2000) then return '0' end
  return '0.05'
end
local limit, remaining, reset, window = tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4])
local margin = tonumber(ARGV[1])
if reset + margin <= now then
  reset = now + window + margin
  remaining = limit
end
if remaining <= 0 then return tostring(reset + margin - now) end
redis.call('HSET', KEYS[1], 'remaining', remaining - 1, 'reset', reset)
redis.call('PEXPIRE', KEYS[1], math.ceil((reset - now + window) * 1000) + 60000)
return '0'
"""

# ARGV: limit, remaining, reset_after. The smaller `remaining` wins within one window (answers arrive
# out of order, and workers took from it meanwhile).
_LEARN = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local limit, remaining, reset_after = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reset = now + reset_after
local b = redis.call('HMGET', KEYS[1], 'remaining', 'reset', 'window')
local window = reset_after
if b[3] and tonumber(b[3]) > window then window = tonumber(b[3]) end
if b[2] and tonumber(b[2]) > now and math.abs(tonumber(b[2]) - reset) < 1 then
  if tonumber(b[1]) < remaining then remaining = tonumber(b[1]) end
  if tonumber(b[2]) > reset then reset = tonumber(b[2]) end
end
redis.call('HSET', KEYS[1], 'limit', limit, 'remaining', remaining, 'reset', reset, 'window', window)
redis.call('PEXPIRE', KEYS[1], math.ceil((reset - now + window) * 1000) + 60000)
redis.call('DEL', KEYS[2])
return 'ok'
"""

BUCKET_MARGIN_SECONDS = 0.25


@per_process
def _bucket_scripts() -> tuple[object, object, object]:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    return client, client.register_script(_RESERVE), client.register_script(_LEARN)


def reserve(bucket: str, blocked_key: str = "") -> float:
    """Take a request from a learned bucket (and wait out a block on `blocked_key`, such as Discord's
    global limit after a global 429). 0 when admitted, else the seconds to wait; nothing is taken then."""
    _, script, _ = _bucket_scripts()
    keys = [PREFIX + "bucket:" + bucket, PREFIX + "block:" + (blocked_key or "none"), PREFIX + "probe:" + bucket]
    return float(script(keys=keys, args=[BUCKET_MARGIN_SECONDS]))


def learn(bucket: str, *, limit: int, remaining: int, reset_after: float) -> None:
    """What the provider said of a bucket after a request."""
    _, _, script = _bucket_scripts()
    script(keys=[PREFIX + "bucket:" + bucket, PREFIX + "probe:" + bucket], args=[limit, remaining, reset_after])


def unprobe(bucket: str) -> None:
    """An answer that said nothing of its bucket: the next request may go and learn it."""
    client, _, _ = _bucket_scripts()
    client.delete(PREFIX + "probe:" + bucket)


def block(key: str, seconds: float) -> None:
    """Hold every request that checks `key` for `seconds` (a global 429)."""
    client, _, _ = _bucket_scripts()
    millis = max(1, int(seconds * 1000))
    client.set(PREFIX + "block:" + key, "1", px=millis)
