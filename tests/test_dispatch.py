"""The messages dispatch builds for Redis are the ones Celery's `send_task` would have sent."""

import json
import uuid

import pytest
import redis
from celery import Celery
from django.conf import settings

from apps.jobs import dispatch
from apps.jobs.models import Job

# Per message, the parts that are new each time (ids) or name the sending process.
VARYING = {"id", "root_id", "correlation_id", "delivery_tag"}


@pytest.fixture
def app() -> Celery:
    """A Celery app configured as the project's, on a Redis database no worker consumes from."""
    app = Celery("dispatch-test", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.broker_url = settings.REDIS_URL.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(app.conf.broker_url)
    client.flushdb()
    yield app
    client.flushdb()
    app.close()


def stored(app: Celery) -> dict[str, list[dict]]:
    """Every message on the broker, by Redis key, oldest first, with its body decoded."""
    client = redis.Redis.from_url(app.conf.broker_url)
    found = {}
    for key in sorted(k.decode() for k in client.keys("*") if client.type(k) == b"list"):
        messages = [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]
        for message in messages:
            for part in (message["headers"], message["properties"]):
                for name in VARYING & part.keys():
                    part[name] = "<varies>"
            message["headers"]["origin"] = "<process>"
        found[key] = messages
    client.flushdb()
    return found


def test_the_pipelined_messages_equal_what_send_task_stores(app: Celery) -> None:
    jobs = [
        Job(id=uuid.uuid4(), kind="echo", priority="normal", timeout_seconds=30),
        Job(id=uuid.uuid4(), kind="echo", priority="critical", timeout_seconds=5),
        Job(id=uuid.uuid4(), kind="test", priority="low", timeout_seconds=600),
        Job(id=uuid.uuid4(), kind="ai_generate", priority="high", timeout_seconds=300),
    ]
    dispatch._publish_celery(jobs, app)
    by_send_task = stored(app)
    dispatch._publish_redis(jobs, app)
    pipelined = stored(app)

    assert pipelined == by_send_task
    assert sorted(pipelined) == ["ai:3", "builds:9", "default", "default:6"]
    message = pipelined["default:6"][0]
    assert message["headers"]["argsrepr"] == f"['{jobs[0].id}']"
    assert message["headers"]["timelimit"] == [30 + settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS, 30]
    assert message["properties"]["priority"] == 6


def test_each_message_gets_its_own_task_id(app: Celery) -> None:
    job = Job(id=uuid.uuid4(), kind="echo", priority="normal", timeout_seconds=30)
    dispatch._publish_redis([job, job], app)
    client = redis.Redis.from_url(app.conf.broker_url)
    messages = [json.loads(raw) for raw in client.lrange("default:6", 0, -1)]
    ids = {m["headers"]["id"] for m in messages}
    assert len(ids) == 2
    assert all(m["headers"]["root_id"] == m["properties"]["correlation_id"] == m["headers"]["id"] for m in messages)
