"""Live events are sent without waiting for Redis, arrive in order, and a Redis failure never
slows down or fails the process that publishes them."""

import logging
import os
import socket
import time

import pytest
import redis
from django.conf import settings

from apps.jobs import live
from tests.conftest import wait_for


@pytest.fixture
def subscriber() -> redis.client.PubSub:
    pubsub = live.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(live.channel("live-test"))
    yield pubsub
    pubsub.close()


def received(pubsub: redis.client.PubSub, count: int) -> list[bytes]:
    messages: list[bytes] = []

    def more() -> bool:
        while message := pubsub.get_message(timeout=0.05):
            messages.append(message["data"])
        return len(messages) >= count

    wait_for(more, timeout=5, what=f"{count} published messages")
    return messages


def test_events_arrive_in_the_order_they_were_published(subscriber: redis.client.PubSub) -> None:
    publisher = live.Publisher(settings.REDIS_URL)
    for n in range(200):
        publisher.send(("PUBLISH", live.channel("live-test"), str(n)))
    assert received(subscriber, 200) == [str(n).encode() for n in range(200)]


def test_a_refused_command_is_logged_and_later_ones_still_go_out(
    subscriber: redis.client.PubSub, caplog: pytest.LogCaptureFixture
) -> None:
    live.client().delete("live-test:list")
    live.client().rpush("live-test:list", "x")  # APPEND on a list: Redis answers WRONGTYPE
    publisher = live.Publisher(settings.REDIS_URL)
    publisher.send(("APPEND", "live-test:list", "text"), ("PUBLISH", live.channel("live-test"), "first"))
    assert received(subscriber, 1) == [b"first"]
    with caplog.at_level(logging.WARNING, logger="apps.jobs.live"):
        for n in range(live.READ_REPLIES_AFTER):  # replies are read a batch at a time
            publisher.send(("PUBLISH", live.channel("live-test"), str(n)))
    assert received(subscriber, live.READ_REPLIES_AFTER) == [str(n).encode() for n in range(live.READ_REPLIES_AFTER)]
    assert "WRONGTYPE" in caplog.text


@pytest.mark.parametrize("server", ["refuses connections", "never answers"])
def test_an_unreachable_redis_costs_one_attempt_not_one_per_event(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if server == "never answers":
            listener.listen()  # the kernel accepts connections; nothing reads or replies
        else:
            listener.close()  # a port nothing listens on
        publisher = live.Publisher(f"redis://127.0.0.1:{port}/0")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="apps.jobs.live"):
            for n in range(1000):
                publisher.send(("PUBLISH", "nowhere", str(n)))
        elapsed = time.monotonic() - started
    # One attempt, bounded by the socket timeout; then publishing pauses instead of trying per event.
    assert elapsed < live.SOCKET_TIMEOUT_SECONDS + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0].getMessage()


def test_a_forked_child_publishes_on_its_own_connection(subscriber: redis.client.PubSub) -> None:
    live.publish("live-test", {"from": "parent, before the fork"})
    assert len(received(subscriber, 1)) == 1
    pid = os.fork()
    if pid == 0:  # the child: publish, then leave without running the parent's cleanup
        try:
            for n in range(50):
                live.publish("live-test", {"from": "child", "n": n})
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    live.publish("live-test", {"from": "parent, after the fork"})  # the parent's connection still works
    messages = received(subscriber, 51)  # two connections: Redis may serve either first
    assert [m for m in messages if b"child" in m] == [f'{{"from": "child", "n": {n}}}'.encode() for n in range(50)]
    assert b'{"from": "parent, after the fork"}' in messages
