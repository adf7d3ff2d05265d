"""Callback delivery (on workers): when a job with a `callback_url` reaches a final status, the lifecycle
publishes `conveyor.deliver_callback`, and `deliver` POSTs the job there as JSON, signed.

Signed as Stripe and GitHub sign their webhooks: `X-Conveyor-Timestamp` is the time of sending (unix
seconds) and `X-Conveyor-Signature: sha256=<hex>` the HMAC-SHA256 of `<timestamp>.<body>` under the job
owner's callback secret (`apps.credentials`). A receiver recomputes it over the raw body, compares in
constant time, and refuses an old timestamp: a captured request cannot be replayed later.
`X-Conveyor-Delivery` is the same for every attempt at one delivery, for receivers that deduplicate.

Where it may connect: the URL is checked again (`apps.jobs.dispatch.callback_url_problem`), its host
resolved once, here, and every address it resolves to must be public (`address_refused`) unless the
host is named in CALLBACK_ALLOWED_HOSTS. The connection goes to one of those addresses, sending the
URL's host as `Host` and in TLS (SNI and the certificate's name), and the address connected to is
checked again: a name that resolves elsewhere a moment later (DNS rebinding) changes nothing. No proxy,
no redirects (a 3xx is the receiver's answer), and CALLBACK_TIMEOUT_SECONDS bounds a whole attempt.

Every attempt is written on the job's timeline (a `callback` event; the job's status does not change).
A receiver that cannot be reached or answers 429 or 5xx raises CallbackFailed, which Celery retries
with backoff (`tasks.entrypoints.deliver_callback`); a refused address is never retried.
"""

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from apps.credentials.services import callback_secret_for
from apps.jobs.dispatch import address_problem, ascii_host, callback_host_allowed, callback_url_problem
from apps.jobs.models import Job, JobEvent
from apps.jobs.statuses import Event


class CallbackFailed(Exception):
    """The receiver could not be reached or answered 429 or a server error: worth another try."""


class CallbackRefused(Exception):
    """The URL, or an address its host stands for, may not be called: another try would not change that."""


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: the URL's parts, and the addresses its host resolved to, all checked."""

    scheme: str
    host: str  # ASCII (IDNA), as sent in `Host` and TLS
    port: int
    path: str
    allowed: bool  # named in CALLBACK_ALLOWED_HOSTS: its addresses are not checked
    addresses: tuple[tuple[int, tuple], ...]  # (family, sockaddr) from getaddrinfo


def job_json(job: Job) -> dict[str, Any]:
    """What a callback says about the job: its outcome, and enough to find it again."""
    return {
        "id": str(job.pk),
        "kind": job.kind,
        "priority": job.priority,
        "status": job.status,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "dead_lettered": job.dead_lettered,
        "idempotency_key": job.idempotency_key,
        "parent": str(job.parent_id) if job.parent_id else None,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Conveyor-Signature` header's value: `sha256=` and the hex HMAC of `<timestamp>.<body>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def deliver(job_id: UUID | str) -> int | None:
    """POST the final job to its callback URL and record the attempt on its timeline. Returns the HTTP
    status, or None when nothing was sent (no such job, no URL, run again since, or refused)."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.callback_url or not job.is_final:
        return None  # a job run again since sends its next final status itself
    # One delivery per final status reached: its attempts share an id, and are counted on the timeline.
    delivery = str(uuid.uuid5(job.pk, f"{job.status}:{job.finished_at}"))
    attempt = 1 + JobEvent.objects.filter(job_id=job.pk, type=Event.CALLBACK, data__delivery=delivery).count()
    body = json.dumps(job_json(job), cls=DjangoJSONEncoder, separators=(",", ":")).encode()
    try:
        target = resolve(job.callback_url)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Conveyor",
            "Connection": "close",
            "X-Conveyor-Job": str(job.pk),
            "X-Conveyor-Delivery": delivery,
            "X-Conveyor-Timestamp": str(timestamp),
            "X-Conveyor-Signature": signature(callback_secret_for(job.owner_id), timestamp, body),
        }
        code, address = post(target, body, headers, settings.CALLBACK_TIMEOUT_SECONDS)
    except CallbackRefused as exc:
        _record(job, delivery, attempt, f"refused: {exc}", error=str(exc), retry=False)
        return None
    except (OSError, http.client.HTTPException) as exc:  # DNS, connection, TLS, timeout, a broken answer
        reason = _describe(exc)
        _record(job, delivery, attempt, f"unreachable ({reason}), to be retried", error=reason, retry=True)
        raise CallbackFailed(f"callback unreachable: {reason}") from None
    retry = code >= 500 or code == 429
    if retry:
        outcome = "to be retried"
    elif 200 <= code < 300:
        outcome = "delivered"
    elif 300 <= code < 400:
        outcome = "not followed, not retried"
    else:
        outcome = "not retried"  # the receiver refused it; another try would get the same answer
    _record(job, delivery, attempt, f"answered {code}, {outcome}", status_code=code, address=address, retry=retry)
    if retry:
        raise CallbackFailed(f"callback answered {code}")
    return code


def _record(job: Job, delivery: str, attempt: int, outcome: str, **data: Any) -> None:
    JobEvent.objects.create(
        job_id=job.pk,
        at=timezone.now(),
        type=Event.CALLBACK,
        status=job.status,
        message=f"callback attempt {attempt}: {outcome}",
        data={"delivery": delivery, "attempt": attempt, **data},
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror or exc})"
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def resolve(url: str) -> Target:
    """Check `url` and resolve its host, once. Raises CallbackRefused for a refused URL or address, and
    OSError (socket.gaierror) when the name does not resolve."""
    if problem := callback_url_problem(url):
        raise CallbackRefused(problem)
    parts = urlsplit(url)
    written = parts.hostname or ""
    host = ascii_host(written) or ""
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    allowed = callback_host_allowed(written)
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = tuple((family, sockaddr) for family, _, _, _, sockaddr in found)
    if not allowed:
        for _, sockaddr in addresses:
            _check(host, sockaddr[0])
    path = parts.path or "/"
    return Target(scheme, host, port, f"{path}?{parts.query}" if parts.query else path, allowed, addresses)


def _check(host: str, address: str) -> None:
    if problem := address_problem(host, ipaddress.ip_address(address.split("%", 1)[0])):
        raise CallbackRefused(problem)


def _connect(target: Target, timeout: float) -> socket.socket:
    """A TCP connection to the first of `target`'s addresses that answers, the address checked once more
    as the peer of the connection made."""
    error: OSError = OSError(f"no address for {target.host}")
    for family, sockaddr in target.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            if not target.allowed:
                _check(target.host, sock.getpeername()[0])
        except CallbackRefused:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """http.client's connection to the resolved, checked addresses: it never resolves the host itself."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.target = target

    def connect(self) -> None:
        self.sock = _connect(self.target, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked against the URL's host, which SNI names."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self.tls)
        self.target = target

    def connect(self) -> None:
        self.sock = self.tls.wrap_socket(_connect(self.target, self.timeout), server_hostname=self.target.host)


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST `body` and read the answer's status line and headers (its body is not read). Returns the
    status and the address connected to. `timeout` bounds the whole attempt, not each read: a receiver
    that trickles its answer a byte at a time has the connection cut."""
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = kind(target, timeout)
    cut = threading.Event()
    watchdog = threading.Timer(timeout, _cut, [connection, cut])
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        address = connection.sock.getpeername()[0]  # before the answer: a closing answer drops `sock`
        return connection.getresponse().status, address
    except (OSError, http.client.HTTPException):
        if cut.is_set():
            raise TimeoutError from None
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _cut(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    cut.set()
    if (sock := connection.sock) is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread; close() would not
