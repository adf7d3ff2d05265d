"""Publishing jobs to Celery. A message carries the job id only; the row carries everything else.

`apps.jobs` never imports worker code: it sends the task by its stable name.
"""

import ipaddress
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import redis
from celery import Celery, current_app
from django.conf import settings
from django.db import transaction
from kombu.entity import PERSISTENT_DELIVERY_MODE as DELIVERY_MODE
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from apps.jobs.kinds import get_kind
from apps.jobs.models import Job, Priority

log = logging.getLogger(__name__)

RUN_JOB = "conveyor.run_job"
DELIVER_CALLBACK = "conveyor.deliver_callback"  # delivered by tasks/callbacks.py
# The worker control command that stops a cancelled job's running attempt (tasks/entrypoints.py).
CANCEL_COMMAND = "conveyor_cancel"
PUBLISH_BATCH = 500

# Redis serves priority 0 first; AMQP serves the highest number first.
REDIS_PRIORITY = {
    Priority.CRITICAL: 0,
    Priority.HIGH: 3,
    Priority.NORMAL: 6,
    Priority.LOW: 9,
}
AMQP_PRIORITY = {
    Priority.CRITICAL: 9,
    Priority.HIGH: 6,
    Priority.NORMAL: 3,
    Priority.LOW: 0,
}


def broker_priority(priority: str) -> int:
    return (REDIS_PRIORITY if settings.BROKER_IS_REDIS else AMQP_PRIORITY)[priority]


def queue_for(job: Job) -> str:
    return get_kind(job.kind).queue


def publish(
    jobs: Sequence[Job], *, countdown: float | None = None, front: bool = False, app: Celery | None = None
) -> None:
    """Send one message per job over one broker connection. Raises if the broker is unreachable.

    `front`: at the head of their priority's list (Redis), where a message that was lost should have
    been; it is taken before the jobs published after it.
    """
    app = app or current_app
    if not jobs:
        return
    if settings.BROKER_IS_REDIS and countdown is None:
        _publish_redis(jobs, app, front)
    else:
        _publish_celery(jobs, app, countdown)


def _publish_celery(jobs: Sequence[Job], app: Celery, countdown: float | None = None) -> None:
    grace = settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(
                RUN_JOB,
                args=[str(job.pk)],
                queue=queue_for(job),
                priority=broker_priority(job.priority),
                soft_time_limit=job.timeout_seconds,
                time_limit=job.timeout_seconds + grace,
                countdown=countdown,
                producer=producer,
            )


def _publish_redis(jobs: Sequence[Job], app: Celery, front: bool = False) -> None:
    """The messages `send_task` would send, built from one template and pipelined to Redis.

    `send_task` spends about 200 µs of Python per message (routing, signals, building the headers,
    kombu's serializer registry), and kombu builds a new Redis client for every publish: a batch of
    thousands made publishing the slowest part of a submission, and a single job's publish about a
    fifth of its pickup latency. Here Celery builds the message once per process (`as_task_v2`), each
    job's copy changes only what differs (ids, time limits, priority, queue), kombu's Redis channel
    wraps it as it wraps any message (`prepare_message`, `_inplace_augment_message`) and names its
    priority list (`_q_for_pri`), and one kept client on the channel's connection pool pushes them,
    PUBLISH_BATCH per round trip. `tests/test_dispatch.py` pins the result to what `send_task`
    stores, field by field. Not sent: the `before/after_task_publish` signals and the `task-sent`
    event (off by default).
    """
    grace = settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS
    headers, properties, body = _template(app, app.thread_oid, os.getpid())
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        with _client_for(channel.pool).pipeline(transaction=False) as pipe:
            for number, job in enumerate(jobs, 1):
                task_id, job_id, queue = uuid(), str(job.pk), queue_for(job)
                priority = broker_priority(job.priority)
                message = channel.prepare_message(
                    dumps(([job_id], *body[1:])),
                    priority,
                    "application/json",
                    "utf-8",
                    {
                        **headers,
                        "id": task_id,
                        "root_id": task_id,
                        "argsrepr": repr([job_id]),  # what saferepr gives for a list of one string
                        "timelimit": [job.timeout_seconds + grace, job.timeout_seconds],
                    },
                    {**properties, "correlation_id": task_id, "delivery_mode": DELIVERY_MODE},
                )
                channel._inplace_augment_message(message, "", queue)
                # Workers take from the right end (BRPOP): the left is the back of the line.
                push = pipe.rpush if front else pipe.lpush
                push(channel._q_for_pri(queue, priority), dumps(message))
                if number % PUBLISH_BATCH == 0:
                    pipe.execute()
            pipe.execute()


@lru_cache(maxsize=32)
def _template(app: Celery, reply_to: str, pid: int) -> tuple[dict, dict, tuple]:
    """The parts of a run_job message that are the same for every job sent by this process and
    thread (the sender's name and reply address)."""
    message = app.amqp.as_task_v2("", RUN_JOB, args=[""], reply_to=reply_to, ignore_result=None)
    return message.headers, message.properties, message.body


_clients: "WeakKeyDictionary[redis.ConnectionPool, redis.Redis]" = WeakKeyDictionary()


def _client_for(pool: redis.ConnectionPool) -> redis.Redis:
    if pool not in _clients:
        _clients[pool] = redis.Redis(connection_pool=pool)
    return _clients[pool]


def publish_safely(jobs: Sequence[Job], *, countdown: float | None = None, front: bool = False) -> bool:
    """Publish, and on a broker failure leave the jobs to the reconciler: their rows are already safe."""
    try:
        publish(jobs, countdown=countdown, front=front)
    except Exception:
        log.exception(
            "could not publish %d job(s); the reconciler will re-publish them",
            len(jobs),
        )
        return False
    return True


def publish_on_commit(jobs: Sequence[Job]) -> None:
    """Publish once the surrounding transaction commits, so no worker looks for a row not yet there."""
    jobs = [job for job in jobs if job.status == Job.Status.QUEUED]
    if jobs:
        transaction.on_commit(lambda: publish_safely(jobs))


def publish_callback_on_commit(job: Job) -> None:
    """Once the job's final state is committed, have a worker POST it to the job's callback URL.

    A broker failure is logged, not raised: the job's outcome is already committed and stays readable.
    """
    if job.callback_url:
        transaction.on_commit(lambda: _publish_callback(job))


def _publish_callback(job: Job) -> None:
    try:
        current_app.send_task(
            DELIVER_CALLBACK, args=[str(job.pk)], queue="default", priority=broker_priority(Priority.HIGH)
        )
    except Exception:
        log.exception("could not publish the callback of job %s", job.pk)


# Callback addresses -----------------------------------------------------------------------------------
# A callback URL is the user's, so it may name anything the worker can reach: the cloud's metadata
# service, a database on the private network, the worker's own loopback. Any public host may be called;
# a refused address (below) only when its host is named in CALLBACK_ALLOWED_HOSTS. Checked on the URL
# at submission (`callback_url_problem`, the serializer) and on every address the host resolves to at
# delivery, the one connected to included (`tasks.callbacks`).

CALLBACK_SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
REFUSED_KINDS = ("unspecified", "loopback", "link_local", "multicast", "private", "reserved", "site_local")


def callback_host_allowed(host: str) -> bool:
    """Whether `host` (a URL's host, IPv6 without brackets) is named in CALLBACK_ALLOWED_HOSTS, which
    lifts the address checks for it. Compared as written, lowercased: `127.1` and `0x7f000001` are not
    `127.0.0.1`, and there is no wildcard (a "*" would turn the checks off for every host)."""
    allowed = {name.lower().strip("[]") for name in settings.CALLBACK_ALLOWED_HOSTS}
    return host.lower() in allowed


def address_refused(address: IPAddress) -> str | None:
    """Why a callback may not connect to `address` ("loopback", "private", ...), or None when it is a
    public one. An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by
    that too: `::ffff:127.0.0.1` is loopback."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in _embedded_ipv4(address):
            if reason := address_refused(embedded):
                return reason
    for kind in REFUSED_KINDS:
        if getattr(address, f"is_{kind}", False):
            return kind.replace("_", "-")
    if not address.is_global:  # shared address space (100.64.0.0/10) and the like
        return "non-global"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    if address in NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ip for ip in found if ip is not None]


def ascii_host(host: str) -> str | None:
    """`host` as the resolver gets it: IDNA-encoded, as `socket.getaddrinfo` encodes a name (so
    fullwidth digits and ideographic full stops become ASCII ones). None if it cannot be encoded."""
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def host_address(host: str) -> IPAddress | None:
    """The address `host` (ASCII, IPv6 without brackets) is written as, in any spelling the C library's
    resolver accepts, or None for a name: dotted, decimal (`2130706433`), hexadecimal (`0x7f000001`,
    `0x7f.1`), octal (`0177.0.0.1`), short (`127.1`), a trailing dot, IPv6 (`::ffff:127.0.0.1`)."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])  # a zone (`%eth0`) changes nothing here
        except ValueError:
            return None
    return _ipv4(host)


def _ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's (and the WHATWG URL standard's) reading of a numeric host: one to four parts, each
    decimal, octal (leading 0) or hexadecimal (0x); the last fills the bytes the others left."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            digits, base, alphabet = part[2:] or "0", 16, "0123456789abcdefABCDEF"
        elif len(part) > 1 and part.startswith("0"):
            digits, base, alphabet = part[1:], 8, "01234567"
        else:
            digits, base, alphabet = part, 10, "0123456789"
        if not digits or any(c not in alphabet for c in digits):  # int() would take "+1", " 1", "1_0"
            return None
        numbers.append(int(digits, base))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for position, number in enumerate(head):
        value += number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


def callback_url_problem(url: str) -> str | None:
    """Why a job may not have `url` as its callback URL, or None. Only what the URL itself says is
    checked here (its scheme, a host written as a refused address, `localhost`); a name is resolved,
    and every address it stands for checked, at delivery."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in CALLBACK_SCHEMES:
        return "Only http and https callback URLs are allowed."
    try:
        host = parts.hostname
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError:
        return "Enter a valid URL."
    if not host:
        return "Enter a valid URL."
    if callback_host_allowed(host):
        return None
    name = ascii_host(host)
    if name is None:
        return "Enter a valid URL."
    if name.rstrip(".") == "localhost" or name.rstrip(".").endswith(".localhost"):  # loopback (RFC 6761)
        return f"{host} is a loopback name: {NOT_ALLOWED}"
    address = host_address(name)
    return address_problem(host, address) if address is not None else None


NOT_ALLOWED = "callbacks to it are not allowed unless the host is listed in CALLBACK_ALLOWED_HOSTS."


def address_problem(host: str, address: IPAddress) -> str | None:
    """Why a callback to `host` may not go to `address` (the host as written, or what it resolved to),
    or None."""
    reason = address_refused(address)
    if reason is None:
        return None
    what = f"{'an' if reason[0] in 'aeiou' else 'a'} {reason} address"
    return f"{host} is {what}: {NOT_ALLOWED}" if host == str(address) else f"{host} is {address}, {what}: {NOT_ALLOWED}"
