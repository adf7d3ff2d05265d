"""`?wait=N` on `POST /api/jobs/` and `GET /api/jobs/{id}/`: the request is held until the job is
final or N seconds passed (at most JOBS_MAX_WAIT_SECONDS), then answered with the job: 200 when final,
202 with the job as it stands. What a bot or a gateway wants from a queue: a request and its response.

Async views: the job is submitted or read by the API's own view (authentication, validation,
throttles, visibility), then the wait is on the job's live events, as an event stream waits
(`apps.jobs.streams`): no thread is held while a request waits, and a wait counts as one of the
user's open streams (JOBS_MAX_STREAMS_PER_USER)."""

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse, JsonResponse

from apps.jobs import streams
from apps.jobs.api.jobs import JobViewSet
from apps.jobs.api.serializers import JobSerializer
from apps.jobs.models import Job

_list = JobViewSet.as_view({"get": "list", "post": "create"})
_detail = JobViewSet.as_view({"get": "retrieve"})


def _seconds(request: HttpRequest) -> float | JsonResponse | None:
    """The wait asked for: None when not asked, a 400 answer when not a number of seconds."""
    if "wait" not in request.GET:
        return None
    try:
        seconds = float(request.GET["wait"])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        return JsonResponse({"wait": ["A number of seconds, 0 or more."]}, status=400)
    return min(seconds, settings.JOBS_MAX_WAIT_SECONDS)


async def job_list(request: HttpRequest) -> HttpResponse:
    seconds = _seconds(request)
    if isinstance(seconds, JsonResponse):
        return seconds
    response = await sync_to_async(_list)(request)
    if seconds is None or request.method != "POST" or response.status_code not in (200, 201):
        return response
    return await _answer(request, response.data["id"], seconds)


async def job_detail(request: HttpRequest, pk: str) -> HttpResponse:
    seconds = _seconds(request)
    if isinstance(seconds, JsonResponse):
        return seconds
    response = await sync_to_async(_detail)(request, pk=pk)
    if seconds is None or response.status_code != 200:
        return response
    return await _answer(request, pk, seconds)


async def _answer(request: HttpRequest, job_id: str, seconds: float) -> JsonResponse:
    job = await streams.in_database_thread(lambda: Job.objects.select_related("owner").get(pk=job_id))()
    job = await streams.until_final(job, request.user.pk, seconds)
    data = await streams.in_database_thread(lambda: JobSerializer(job).data)()
    return JsonResponse(data, status=200 if job.is_final else 202, encoder=DjangoJSONEncoder)
