"""Job callbacks: a final job is POSTed to its callback URL, signed with its owner's secret, through a
real worker, to a real HTTP server started by the test; retried after a 5xx, every attempt on the job's
timeline; refused for private addresses however they are spelled, at submission and at delivery.

A few tests call `tasks.callbacks.deliver` in this process instead, to control what a name resolves
to or how a receiver misbehaves; the worker runs that same function."""

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.credentials.models import CallbackSecret
from apps.jobs.models import Job, JobEvent
from tasks import callbacks
from tests.conftest import WorkerProcess, wait_for
from tests.factories import make_job, submit

REPLAY_TOLERANCE_SECONDS = 300  # what a receiver would allow


class Receiver(ThreadingHTTPServer):
    """Answers each POST with the next of `answers` (then 204), and keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.calls: list[tuple[int, bytes, dict[str, str]]] = []
        self.answers: list[int] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        code = self.server.answers.pop(0) if self.server.answers else 204
        self.server.calls.append((code, raw, dict(self.headers)))
        self.send_response(code)
        if 300 <= code < 400:
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def verified(secret: str, raw: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """What a receiver does: the signature over `<timestamp>.<body>` checked in constant time, the
    timestamp recent; the body parsed only then."""
    timestamp = headers["X-Conveyor-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Conveyor-Signature"], expected), "bad signature"
    assert abs(time.time() - int(timestamp)) < REPLAY_TOLERANCE_SECONDS, "stale timestamp"
    return json.loads(raw)


def callback_events(job_id: object) -> list[JobEvent]:
    return list(JobEvent.objects.filter(job_id=job_id, type="callback").order_by("at", "id"))


# Through the worker ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_finished_job_is_posted_signed_with_its_owners_secret_and_retried_after_a_500(
    worker: WorkerProcess, api: APIClient, receiver: Receiver
) -> None:
    # given: the user's callback secret, shown once when made, and a receiver that fails once
    secret = api.post("/api/callback-secret/").json()["secret"]
    receiver.answers = [500]

    # when
    job_id = submit(api, "echo", {"message": "ring"}, callback_url=receiver.url)["id"]
    wait_for(lambda: len(callback_events(job_id)) == 2, timeout=30, what="the callback to be retried and delivered")

    # then: both attempts came signed, as one delivery, with the job's JSON
    assert [code for code, _, _ in receiver.calls] == [500, 204]
    bodies = [verified(secret, raw, headers) for _, raw, headers in receiver.calls]
    first, second = (headers for _, _, headers in receiver.calls)
    assert first["X-Conveyor-Delivery"] == second["X-Conveyor-Delivery"]
    assert second["X-Conveyor-Job"] == job_id
    assert second["Content-Type"] == "application/json"
    assert bodies[1]["id"] == job_id
    assert bodies[1]["status"] == "succeeded"
    assert bodies[1]["result"] == {"message": "ring"}
    assert bodies[1]["finished_at"]
    # and: each attempt is on the timeline, the job's status unchanged
    events = [e for e in api.get(f"/api/jobs/{job_id}/events/").json() if e["type"] == "callback"]
    assert [(e["status"], e["data"]["attempt"], e["data"]["status_code"], e["data"]["retry"]) for e in events] == [
        ("succeeded", 1, 500, True),
        ("succeeded", 2, 204, False),
    ]
    assert events[0]["message"] == "callback attempt 1: answered 500, to be retried"
    assert events[1]["message"] == "callback attempt 2: answered 204, delivered"
    assert api.get(f"/api/jobs/{job_id}/").json()["status"] == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_every_final_status_is_called_back(worker: WorkerProcess, api: APIClient, receiver: Receiver) -> None:
    secret = api.post("/api/callback-secret/").json()["secret"]

    failed = submit(api, "echo", {"message": "x", "fail_times": 5}, max_attempts=1, callback_url=receiver.url)["id"]
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    cancelled = submit(api, "echo", {"message": "y"}, run_at=later, callback_url=receiver.url)["id"]
    assert api.post(f"/api/jobs/{cancelled}/cancel/").status_code == 200
    wait_for(lambda: len(receiver.calls) == 2, timeout=30, what="both callbacks")

    statuses = {body["id"]: body["status"] for body in (verified(secret, raw, h) for _, raw, h in receiver.calls)}
    assert statuses == {failed: "failed", cancelled: "cancelled"}


@pytest.mark.django_db(transaction=True)
def test_a_callback_made_before_the_user_asked_for_a_secret_is_signed_with_one_made_then(
    worker: WorkerProcess, api: APIClient, user: User, receiver: Receiver
) -> None:
    job_id = submit(api, "echo", {"message": "first"}, callback_url=receiver.url)["id"]
    wait_for(lambda: callback_events(job_id), timeout=30, what="the callback")

    made = api.get("/api/callback-secret/")
    assert made.status_code == 200
    assert set(made.json()) == {"last4", "created_at"}
    # The user learns a secret by making a new one; callbacks from then on are signed with it.
    secret = api.post("/api/callback-secret/").json()["secret"]
    second = submit(api, "echo", {"message": "second"}, callback_url=receiver.url)["id"]
    wait_for(lambda: callback_events(second), timeout=30, what="the second callback")

    _, raw, headers = receiver.calls[-1]
    assert verified(secret, raw, headers)["id"] == second
    with pytest.raises(AssertionError, match="bad signature"):
        verified(secret, *receiver.calls[0][1:])


# Private addresses, in every spelling -------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.1",  # short forms: the last part fills the bytes left
    "127.0.1",
    "2130706433",  # one decimal number
    "0x7f000001",  # hexadecimal
    "0x7f.0x0.0x0.0x1",
    "0177.0.0.1",  # octal
    "017700000001",
    "127.0.0.1.",  # a trailing dot
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::1]",
    "localhost",
    "LOCALHOST",
    "api.localhost",
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth digits, which IDNA turns into ASCII ones
    "127\u30020\u30020\u30021",  # ideographic full stops
    "0.0.0.0",  # noqa: S104 (unspecified: connecting to it reaches this machine)
    "0",
]
OTHER_REFUSED = [
    "169.254.169.254",  # the cloud's metadata service: link-local
    "[fe80::1]",
    "10.0.0.1",
    "10.1",
    "0xa000001",
    "172.16.0.1",
    "192.168.1.1",
    "[fc00::1]",
    "[fec0::1]",  # site-local (deprecated, still not public)
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "224.0.0.1",  # multicast
    "[ff02::1]",
    "255.255.255.255",
    "240.0.0.1",  # reserved
    "[::]",
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 of 10.0.0.1
]


@pytest.mark.django_db
@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + OTHER_REFUSED)
def test_a_callback_to_a_private_address_in_any_spelling_is_refused_at_submission(api: APIClient, host: str) -> None:
    errors = submit(api, "echo", {"message": "x"}, callback_url=f"http://{host}:8080/hook", expect=400)

    assert list(errors) == ["callback_url"]
    assert Job.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["ftp://example.com/hook", "file:///etc/passwd", "gopher://example.com/"])
def test_a_callback_url_that_is_not_http_is_refused(api: APIClient, url: str) -> None:
    errors = submit(api, "echo", {"message": "x"}, callback_url=url, expect=400)

    assert list(errors) == ["callback_url"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/conveyor?x=1", "http://93.184.216.34:8080/", "https://[2606:4700::1111]/"]
)
def test_a_callback_to_a_public_host_is_accepted(api: APIClient, url: str) -> None:
    assert submit(api, "echo", {"message": "x"}, callback_url=url)["callback_url"] == url


@pytest.mark.django_db
def test_a_refusal_says_why_and_names_the_allow_list(api: APIClient) -> None:
    url = "http://169.254.169.254/latest/meta-data/"

    errors = submit(api, "echo", {"message": "x"}, callback_url=url, expect=400)

    assert errors["callback_url"] == [
        "169.254.169.254 is a link-local address: callbacks to it are not allowed unless the host is listed in "
        "CALLBACK_ALLOWED_HOSTS."
    ]


@pytest.mark.django_db(transaction=True)
def test_a_private_address_in_any_spelling_is_refused_at_delivery_too(
    worker: WorkerProcess, user: User, receiver: Receiver
) -> None:
    # given: jobs whose callback URLs reach the receiver's port on loopback (127.0.0.1, allowed as
    # written, is the only spelling the worker may call), stored as a URL accepted earlier would be
    jobs = [
        make_job(user, Job.Status.SUCCEEDED, callback_url=f"http://{host}:{receiver.port}/hook")
        for host in LOOPBACK_SPELLINGS
    ]

    # when: the worker delivers their callbacks
    wait_for(lambda: all(callback_events(job.pk) for job in jobs), timeout=30, what="every callback attempt")

    # then: none reached the receiver, none is retried, and each refusal is on the job's timeline
    assert receiver.calls == []
    for job in jobs:
        (event,) = callback_events(job.pk)
        assert event.data["retry"] is False
        assert "CALLBACK_ALLOWED_HOSTS" in event.message
        assert event.message.startswith("callback attempt 1: refused: ")


# Delivery, in this process ------------------------------------------------------------------------------


class Resolver:
    """Names this process resolves to addresses the test chooses, and the lookups made of them."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.lookups: list[str] = []


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    resolver, real = Resolver(), socket.getaddrinfo

    def getaddrinfo(host: str, port: object, *args: Any, **kwargs: Any) -> list:
        if host in resolver.names:
            resolver.lookups.append(host)
            host = resolver.names[host]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return resolver


@pytest.mark.django_db
def test_a_name_that_resolves_to_a_private_address_is_refused_before_connecting(
    user: User, receiver: Receiver, resolver: Resolver
) -> None:
    resolver.names["hooks.example.test"] = "127.0.0.1"
    job = make_job(user, Job.Status.SUCCEEDED, callback_url=f"http://hooks.example.test:{receiver.port}/hook")

    assert callbacks.deliver(job.pk) is None

    assert receiver.calls == []
    (event,) = callback_events(job.pk)
    assert event.message == (
        "callback attempt 1: refused: hooks.example.test is 127.0.0.1, a loopback address: callbacks to it are "
        "not allowed unless the host is listed in CALLBACK_ALLOWED_HOSTS."
    )


@pytest.mark.django_db
def test_an_allowed_name_is_resolved_once_and_called_at_that_address_under_its_own_name(
    user: User, receiver: Receiver, resolver: Resolver
) -> None:
    resolver.names["hooks.example.test"] = "127.0.0.1"
    job = make_job(user, Job.Status.SUCCEEDED, callback_url=f"http://hooks.example.test:{receiver.port}/hook?a=1")

    with override_settings(CALLBACK_ALLOWED_HOSTS=["Hooks.Example.Test"]):
        assert callbacks.deliver(job.pk) == 204

    assert resolver.lookups == ["hooks.example.test"]
    ((_, _, headers),) = receiver.calls
    assert headers["Host"] == f"hooks.example.test:{receiver.port}"
    (event,) = callback_events(job.pk)
    assert (event.data["status_code"], event.data["address"]) == (204, "127.0.0.1")


@pytest.mark.django_db
@pytest.mark.parametrize(("code", "outcome"), [(302, "not followed, not retried"), (404, "not retried")])
def test_a_redirect_or_a_client_error_is_an_answer_not_followed_nor_retried(
    user: User, receiver: Receiver, code: int, outcome: str
) -> None:
    receiver.answers = [code]
    job = make_job(user, Job.Status.SUCCEEDED, callback_url=receiver.url)

    assert callbacks.deliver(job.pk) == code

    assert len(receiver.calls) == 1  # the Location was not called
    (event,) = callback_events(job.pk)
    assert event.message == f"callback attempt 1: answered {code}, {outcome}"


@pytest.fixture
def trickler() -> Iterator[int]:
    """A receiver that answers one byte every 0.1 s: each read is quick, the answer never ends."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 1000:
                    if stop.wait(0.1):
                        return
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


@pytest.mark.django_db
def test_a_receiver_that_trickles_its_answer_is_cut_off_and_retried(user: User, trickler: int) -> None:
    job = make_job(user, Job.Status.SUCCEEDED, callback_url=f"http://127.0.0.1:{trickler}/hook")

    started = time.monotonic()
    with override_settings(CALLBACK_TIMEOUT_SECONDS=0.5), pytest.raises(callbacks.CallbackFailed):
        callbacks.deliver(job.pk)

    assert time.monotonic() - started < 3
    (event,) = callback_events(job.pk)
    assert event.message == "callback attempt 1: unreachable (timed out), to be retried"


@pytest.mark.django_db
def test_an_unreachable_receiver_is_retried_and_the_attempts_are_counted(user: User) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # nothing listens there once closed
    job = make_job(user, Job.Status.SUCCEEDED, callback_url=f"http://127.0.0.1:{port}/hook")

    for _ in range(2):
        with pytest.raises(callbacks.CallbackFailed, match="unreachable"):
            callbacks.deliver(job.pk)

    assert [(e.data["attempt"], e.data["retry"]) for e in callback_events(job.pk)] == [(1, True), (2, True)]


# The secret ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_callback_secret_is_shown_once_kept_encrypted_and_can_be_replaced(
    api: APIClient, other_api: APIClient
) -> None:
    assert api.get("/api/callback-secret/").status_code == 404

    made = api.post("/api/callback-secret/")
    assert made.status_code == 201
    secret = made.json()["secret"]
    assert secret.startswith("whsec_")
    assert len(secret) > 40
    shown = api.get("/api/callback-secret/").json()
    assert shown == {"last4": secret[-4:], "created_at": made.json()["created_at"]}
    assert secret not in CallbackSecret.objects.get().encrypted_secret

    replaced = api.post("/api/callback-secret/").json()["secret"]
    assert replaced != secret
    assert api.get("/api/callback-secret/").json()["last4"] == replaced[-4:]
    assert other_api.get("/api/callback-secret/").status_code == 404  # each user their own
    assert CallbackSecret.objects.count() == 1
