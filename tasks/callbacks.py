"""Callback delivery (on workers): when a job with a `callback_url` finishes, the lifecycle publishes
`conveyor.deliver_callback`, and this POSTs the job's outcome there as JSON.

Only hosts listed in CALLBACK_ALLOWED_HOSTS are called (checked at submission and again here, see
`apps.jobs.dispatch.callback_host_allowed`), redirects are not followed, and a failed delivery is
retried by Celery with backoff.
"""

import json
import urllib.error
import urllib.request
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder

from apps.jobs.dispatch import callback_host_allowed as host_allowed
from apps.jobs.models import Job


class CallbackFailed(Exception):
    """The receiver could not be reached or answered with a server error: worth another try."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is the receiver's answer, not an invitation to call another host


_opener = urllib.request.build_opener(_NoRedirects)


def body(job: Job) -> dict[str, Any]:
    return {
        "id": str(job.pk),
        "kind": job.kind,
        "status": job.status,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "dead_lettered": job.dead_lettered,
        "finished_at": job.finished_at,
    }


def deliver(job_id: UUID | str) -> int | None:
    """POST the job's outcome to its callback URL. Returns the HTTP status, or None if nothing to send."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or not job.callback_url or not host_allowed(job.callback_url):
        return None
    request = urllib.request.Request(  # noqa: S310 (http(s) only: URLField and the host allow-list)
        job.callback_url,
        data=json.dumps(body(job), cls=DjangoJSONEncoder).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "Conveyor", "X-Conveyor-Job": str(job.pk)},
        method="POST",
    )
    try:
        with _opener.open(request, timeout=settings.CALLBACK_TIMEOUT_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise CallbackFailed(f"callback answered {exc.code}") from None
        return exc.code  # the receiver refused it; another try would get the same answer
    except OSError as exc:
        raise CallbackFailed(f"callback unreachable: {type(exc).__name__}") from None
