"""Rate limits shared by every worker (tasks/channels/ratelimit.py), on the session's private Redis:
several processes taking from one limit never pass it together, and a request that must pass two
limits takes from both or from neither."""

import multiprocessing
import os
import time
import uuid
from collections import Counter

import pytest
import redis
from django.conf import settings

from tasks.channels.ratelimit import PREFIX, Limit, acquire, try_acquire


def _hammer(scope: str, rate: float, until: float, out: "multiprocessing.Queue[list[float]]") -> None:
    """One worker: takes slots as fast as the limit gives them, recording Redis's time of each."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.test_settings")
    import django

    django.setup()
    client = redis.Redis.from_url(settings.REDIS_URL)
    granted = []
    while time.time() < until:
        if acquire([Limit(scope, rate)], max_wait=0.5) == 0:
            seconds, micros = client.time()
            granted.append(seconds + micros / 1e6)
    out.put(granted)


def test_four_processes_share_one_limit_and_never_pass_it_in_any_second() -> None:
    scope, rate = f"test:{uuid.uuid4()}", 50.0
    out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    until = time.time() + 3.5
    workers = [
        multiprocessing.get_context("spawn").Process(target=_hammer, args=(scope, rate, until, out)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=30) for _ in workers]
    granted = sorted(t for result in results for t in result)
    for worker in workers:
        worker.join(10)

    first, last = granted[0], granted[-1]
    per_second = Counter(int(t - first) for t in granted if t - first < int(last - first))
    assert per_second  # a check of nothing proves nothing
    assert max(per_second.values()) <= rate + 1  # a window may hold the slot that ends the one before
    assert min(per_second.values()) >= rate * 0.9  # and the workers did not leave the limit unused
    assert all(results)  # every process took slots of the one limit


def test_a_request_under_two_limits_takes_from_both_or_from_neither() -> None:
    sender = Limit(f"test:sender:{uuid.uuid4()}", per_second=1)
    destination = Limit(f"test:to:{uuid.uuid4()}", per_second=1)
    other = Limit(f"test:to:{uuid.uuid4()}", per_second=1)

    assert try_acquire([destination]) == 0  # the destination's slot is taken by another sender
    wait = try_acquire([sender, destination])
    assert 0.9 < wait <= 1.0
    # The refused request took nothing from the sender: a request to another destination passes.
    assert try_acquire([sender, other]) == 0
    assert try_acquire([sender]) > 0.9


def test_a_burst_is_allowed_then_the_rate_holds_and_the_keys_expire() -> None:
    limit = Limit(f"test:burst:{uuid.uuid4()}", per_second=10, burst=5)

    assert [try_acquire([limit]) for _ in range(5)] == [0.0] * 5
    assert try_acquire([limit]) == pytest.approx(0.1, abs=0.02)
    ttl = redis.Redis.from_url(settings.REDIS_URL).pttl(PREFIX + limit.scope)
    assert 0 < ttl <= 1000 + 600  # gone once nothing is owed: no key per destination for ever


def test_acquire_gives_up_beyond_its_longest_wait_without_taking_a_slot() -> None:
    limit = Limit(f"test:slow:{uuid.uuid4()}", per_second=0.5)
    slept: list[float] = []

    assert acquire([limit], max_wait=1) == 0
    assert acquire([limit], max_wait=1, sleep=slept.append) == pytest.approx(2, abs=0.05)
    assert slept == []  # it did not wait for a slot it could not have in time
    assert try_acquire([limit]) == pytest.approx(2, abs=0.05)  # and took none


def test_waiting_requests_take_their_slots_in_turn_instead_of_racing() -> None:
    limit = Limit(f"test:turns:{uuid.uuid4()}", per_second=10)
    slept: list[float] = []

    assert [acquire([limit], max_wait=0.25, sleep=slept.append) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert slept == [pytest.approx(0.1, abs=0.02), pytest.approx(0.2, abs=0.02)]  # each its own slot
    assert acquire([limit], max_wait=0.25, sleep=slept.append) == pytest.approx(0.3, abs=0.02)  # refused
    assert len(slept) == 2
