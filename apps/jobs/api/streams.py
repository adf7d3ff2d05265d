"""`GET /api/jobs/{id}/stream/`: Server-Sent Events of one job, an async view served without a thread
per open stream (see `apps.jobs.streams`). Authentication, visibility and throttling are those of the
rest of the API; a user may hold JOBS_MAX_STREAMS_PER_USER streams open at once (429 beyond)."""

from types import SimpleNamespace

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import ValidationError

from apps.jobs import streams
from apps.jobs.models import Job
from project.api import ReadThrottle
from project.parsers import offset_param


def _token_user(key: str) -> AbstractBaseUser | None:
    token = Token.objects.select_related("user").filter(key=key).first()
    return token.user if token and token.user.is_active else None


async def _user(request: HttpRequest) -> AbstractBaseUser | None:
    """As DRF's TokenAuthentication and SessionAuthentication would find it (a session is enough
    for a GET: no CSRF check applies)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "token" and key:
        return await streams.in_database_thread(_token_user)(key.strip())
    user = await request.auser()  # in this request's own thread: its connection is let go at once
    await sync_to_async(close_old_connections)()
    return user if user.is_authenticated else None


def _throttled(user: AbstractBaseUser, request: HttpRequest) -> float | None:
    throttle = ReadThrottle()
    if throttle.allow_request(SimpleNamespace(user=user, META=request.META), None):
        return None
    return throttle.wait() or 1.0


async def job_stream(request: HttpRequest, pk: str) -> HttpResponse:
    """Server-Sent Events: `status`, `log`, `progress`, ... until the job is final, then `end`."""
    if request.method != "GET":
        return JsonResponse({"detail": f'Method "{request.method}" not allowed.'}, status=405)
    user = await _user(request)
    if user is None:
        return JsonResponse({"detail": "Authentication credentials were not provided."}, status=401)
    try:
        offset = offset_param(request.GET)
    except ValidationError as exc:  # not a DRF view: its exception handler does not answer here
        return JsonResponse(exc.detail, status=400)
    if (wait := await streams.in_database_thread(_throttled)(user, request)) is not None:
        response = JsonResponse({"detail": f"Request was throttled. Expected available in {int(wait)} seconds."})
        response.status_code, response["Retry-After"] = 429, str(int(wait))
        return response
    job = await streams.in_database_thread(lambda: Job.objects.visible_to(user).filter(pk=pk).first())()
    if job is None:
        return JsonResponse({"detail": "No Job matches the given query."}, status=404)
    stream_id = await streams.admit(user.pk)
    if stream_id is None:
        limit = settings.JOBS_MAX_STREAMS_PER_USER
        return JsonResponse(
            {"detail": f"Too many open event streams: at most {limit} per user (JOBS_MAX_STREAMS_PER_USER)."},
            status=429,
        )
    response = StreamingHttpResponse(
        streams.job_events(job, offset, user.pk, stream_id), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response
