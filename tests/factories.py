"""One way to make what the tests need: users and their API tokens, jobs in any status, uploads and
users' provider keys; and `submit`, a job sent through the API as a client sends it.

Jobs are made as the product makes them: inserted by `lifecycle.create_jobs` (queued, or scheduled
when `run_at` is ahead) and moved along the state machine by the lifecycle's own transitions. Nothing
here writes a job's `status`. Once committed, a job is published as any other is, so a running worker
runs a queued one (and refuses the others: their claim fails).
"""

import itertools
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from apps.credentials.models import Credential
from apps.credentials.services import store_credential
from apps.jobs import ai_requests, lifecycle
from apps.jobs.models import Job, Status, Upload
from apps.jobs.services import build_job, save_upload
from apps.jobs.statuses import ErrorType
from tests.tooljobs import sample_files, tar_gz

# Where the factory's attempts run, as a claim records it: a worker on another machine, so that the
# platform judges them by their lease alone.
WORKER, PROCESS = "factory@test", "factory:1@test"
_numbers = itertools.count(1)


def make_user(username: str = "", *, password: str | None = None, staff: bool = False, superuser: bool = False) -> User:
    """A user (`user-<n>` unless named); staff, or a superuser, when asked."""
    username = username or f"user-{next(_numbers)}"
    if superuser:
        return User.objects.create_superuser(username, f"{username}@example.test", password)
    return User.objects.create_user(username, password=password, is_staff=staff)


def api_token(user: User) -> str:
    """`user`'s API token, made on first use."""
    return Token.objects.get_or_create(user=user)[0].key


def sample_payload(kind: str) -> dict[str, Any]:
    """A valid payload of `kind` as a client sends it."""
    if kind == "echo":
        return {"message": "m"}
    if kind == "ai_generate":
        return {"prompt": "hi", "dedupe": False}
    if kind == "message":
        return {"channel": "email", "to": "dev@example.test", "text": "hi"}
    return {"source": {"files": {"test_a.py": "def test_a():\n    pass\n"}}}  # build, test, lint


def make_job(
    owner: User,
    status: str = Status.QUEUED,
    *,
    kind: str = "echo",
    payload: dict[str, Any] | None = None,
    attempts: int = 1,
    result: Any = None,
    **fields: Any,
) -> Job:
    """A job of `owner` in `status`, taken there through the lifecycle:

    - scheduled: created with `run_at` an hour ahead (unless `fields` give one);
    - queued: created;
    - running: claimed, on attempt `attempts` (each earlier attempt lost with its worker, and counted);
    - retrying: claimed, and the attempt ended with a passing failure;
    - succeeded: claimed, and succeeded with `result` (`{}` unless given);
    - failed: claimed, and the attempt ended with a permanent failure (dead-lettered);
    - timed_out: claimed, and the attempt ended past its deadline (dead-lettered);
    - cancelled: created, then cancelled.

    `payload` is stored over the kind's sample payload (an ai_generate one resolved, as the API stores
    it); `fields` are the submission's (priority, max_attempts, timeout_seconds, run_at, parent, ...).
    Returns the job as its row now is.
    """
    payload = {**sample_payload(kind), **(payload or {})}
    if kind == "ai_generate":
        payload = ai_requests.resolve(payload, None)
    spec = {"kind": kind, "payload": payload, **fields}
    if status == Status.SCHEDULED:
        spec.setdefault("run_at", timezone.now() + timedelta(hours=1))
    # One transaction: the job is published (once committed) only when it is in its status.
    with transaction.atomic():
        job = lifecycle.create_jobs([build_job(owner, spec)])[0]
        if status == Status.CANCELLED:
            lifecycle.cancel(job.pk)
        elif status not in (Status.SCHEDULED, Status.QUEUED):
            _end_attempt(_claim(job, attempts), status, result)
    job = Job.objects.get(pk=job.pk)
    assert job.status == status, f"the lifecycle took the job to {job.status}, not to {status}"
    return job


def _claim(job: Job, attempt: int) -> Job:
    for _ in range(attempt - 1):
        running = lifecycle.claim(job.pk, task_id=f"factory-{job.pk}", worker=WORKER, process=PROCESS)
        assert running is not None
        assert lifecycle.recover_lost(running, "worker lost", publish=False) == Status.QUEUED
    running = lifecycle.claim(job.pk, task_id=f"factory-{job.pk}", worker=WORKER, process=PROCESS)
    assert running is not None, "the job could not be claimed (not due?)"
    return running


def _end_attempt(job: Job, status: str, result: Any) -> None:
    if status == Status.SUCCEEDED:
        lifecycle.succeed(job, {} if result is None else result)
    elif status == Status.RETRYING:
        lifecycle.end_attempt(job, "RetryableError", "failed, for another attempt", retryable=True)
    elif status == Status.FAILED:
        lifecycle.end_attempt(job, "PermanentError", "failed for good", retryable=False)
    elif status == Status.TIMED_OUT:
        lifecycle.end_attempt(job, ErrorType.TIMED_OUT, "", retryable=False, timed_out=True)
    elif status != Status.RUNNING:
        raise ValueError(f"no job status {status!r}")


def make_upload(owner: User, data: bytes | None = None, name: str = "sample.tar.gz") -> Upload:
    """An upload of `owner`, checked and kept as the upload endpoint keeps one: `data` (a tar.gz or zip),
    by default the sample project as a tar.gz."""
    return save_upload(owner, SimpleUploadedFile(name, tar_gz(sample_files()) if data is None else data))


def make_credential(owner: User, provider: str = "openai", key: str = "sk-test-0123456789abcdef") -> Credential:
    """`owner`'s key for `provider`, stored (encrypted) as the credentials API stores it."""
    return store_credential(owner, provider, key)[0]


def submit(
    api: APIClient,
    kind: str = "echo",
    payload: dict[str, Any] | None = None,
    *,
    expect: int = 201,
    shortcut: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """POST a job as a client does, check the answer's status code (`expect`), and return its body:
    the job, or the errors.

    `payload` is sent as given (the kind's sample payload when None), `fields` (priority, max_attempts,
    timeout_seconds, run_at, callback_url, ...) beside it. With `shortcut`, an ai_generate job goes
    through POST /api/ai/generate/, which takes the payload and the job's fields in one object.
    """
    payload = sample_payload(kind) if payload is None else payload
    if shortcut:
        assert kind == "ai_generate", "only ai_generate has a shortcut"
        response = api.post("/api/ai/generate/", {**payload, **fields}, format="json")
    else:
        response = api.post("/api/jobs/", {"kind": kind, "payload": payload, **fields}, format="json")
    assert response.status_code == expect, (response.status_code, response.content[:2000])
    return response.json()
