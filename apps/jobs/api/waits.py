"""`?wait=N` on `POST /api/jobs/` and `GET /api/jobs/{id}/`: the answer is held until the job is final
or N seconds passed (at most JOBS_MAX_WAIT_SECONDS), then it is the job: 200 when final, 202 with the job
as it stands. What a bot or a gateway wants from a queue: a request and its response.

A middleware, outside the API's views: the request goes through them as any other (authentication,
validation, throttles, visibility), and only then, if it made or found a job, the middleware waits on
the job's live events as an event stream does (`apps.jobs.streams`). Under ASGI, with every middleware
async-capable, no thread is held while a request waits, and a wait counts as one of the user's open
streams (JOBS_MAX_STREAMS_PER_USER). Requests without `wait` pass straight through."""

import json
import logging
import re
import time
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import sync_and_async_middleware
from redis.exceptions import RedisError

from apps.jobs import streams, waiting
from apps.jobs.api.serializers import JobSerializer
from apps.jobs.models import Job

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1
WAITABLE = re.compile(r"^/api/jobs/(?:[0-9a-fA-F-]{36}/)?$")


def _seconds(request: HttpRequest) -> float | JsonResponse | None:
    """The wait asked for: None when not asked (or not here), a 400 answer when not a number of seconds."""
    if "wait" not in request.GET or not WAITABLE.match(request.path_info):
        return None
    if request.method not in ("GET", "POST") or (request.method == "GET" and request.path_info == "/api/jobs/"):
        return None  # the list: nothing to wait for
    try:
        seconds = float(request.GET["wait"])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        return JsonResponse({"wait": ["A number of seconds, 0 or more."]}, status=400)
    return min(seconds, settings.JOBS_MAX_WAIT_SECONDS)


def _job_id(response: HttpResponse) -> str | None:
    if response.status_code not in (200, 201) or not response.get("Content-Type", "").startswith("application/json"):
        return None
    try:
        return json.loads(response.content).get("id")
    except (ValueError, AttributeError):
        return None


async def _answer(request: HttpRequest, job_id: str, seconds: float) -> JsonResponse:
    job = await streams.in_database_thread(lambda: Job.objects.select_related("owner").get(pk=job_id))()
    try:
        job = await streams.until_final(job, request.user.pk, seconds)
    except (RedisError, OSError):  # live events unreachable: the job exists; answer with it as it stands
        log.warning("?wait= on job %s: live events unreachable, answering at once", job_id, exc_info=True)
        job = await streams.in_database_thread(lambda: Job.objects.select_related("owner").get(pk=job_id))()
    data = await streams.in_database_thread(lambda: _shown(job))()
    return JsonResponse(data, status=200 if job.is_final else 202, encoder=DjangoJSONEncoder)


def _answer_polling(job_id: str, seconds: float) -> JsonResponse:
    """Under WSGI (a thread per request anyway): read the row until it is final or the wait is over."""
    deadline = time.monotonic() + seconds
    job = Job.objects.select_related("owner").get(pk=job_id)
    while not job.is_final and time.monotonic() < deadline:
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        job.refresh_from_db()
    return JsonResponse(_shown(job), status=200 if job.is_final else 202, encoder=DjangoJSONEncoder)


def _shown(job: Job) -> dict:
    """The job as `GET /api/jobs/{id}/` shows it, with why it still waits."""
    return {**JobSerializer(job).data, "waiting_reason": waiting.reason(job)}


@sync_and_async_middleware
def wait_for_jobs(get_response: Callable) -> Callable:
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            seconds = _seconds(request)
            if isinstance(seconds, JsonResponse):
                return seconds
            response = await get_response(request)
            if seconds is None or (job_id := _job_id(response)) is None:
                return response
            return await _answer(request, job_id, seconds)

        return markcoroutinefunction(middleware)

    def sync_middleware(request: HttpRequest) -> HttpResponse:  # WSGI (and the test client): polls
        seconds = _seconds(request)
        if isinstance(seconds, JsonResponse):
            return seconds
        response = get_response(request)
        if seconds is None or (job_id := _job_id(response)) is None:
            return response
        return _answer_polling(job_id, seconds)

    return sync_middleware
