"""What a job produces, read through the API: its log, its live event stream, its artifacts; and
source uploads for build, test and lint jobs."""

import json
import time
from collections.abc import Iterator

from django.conf import settings
from django.http import FileResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import api_view, parser_classes, renderer_classes, throttle_classes
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import live, logs, services
from apps.jobs.api.errors import RequestTooLarge
from apps.jobs.api.parsers import refuse_declared_over
from apps.jobs.api.throttles import ReadThrottle, SubmitThrottle
from apps.jobs.archives import ArchiveError
from apps.jobs.models import Artifact, Job

LOG_PAGE_BYTES = 256 * 1024
KEEPALIVE_SECONDS = 15


def _job(request: Request, pk: str) -> Job:
    return get_object_or_404(Job.objects.visible_to(request.user), pk=pk)


@extend_schema(
    parameters=[OpenApiParameter("offset", int, description="Byte offset to read from (default 0).")],
    responses=inline_serializer(
        "JobLog",
        {"offset": serializers.IntegerField(), "text": serializers.CharField(), "complete": serializers.BooleanField()},
    ),
)
@api_view(["GET"])
@throttle_classes([ReadThrottle])
def job_log(request: Request, pk: str) -> Response:
    """The job's output from byte `offset`. `offset` in the answer is where to continue; `complete`
    is true once the job has finished and everything has been read."""
    job = _job(request, pk)
    raw = request.query_params.get("offset", "0")
    if not raw.isdigit():
        raise ValidationError({"offset": ["A non-negative integer is required."]})
    text, end = logs.read(job, int(raw), LOG_PAGE_BYTES)
    complete = job.is_final and end >= logs.end_offset(job.pk)
    return Response({"offset": end, "text": text, "complete": complete})


class EventStreamRenderer(BaseRenderer):
    media_type = "text/event-stream"
    format = "sse"

    def render(
        self, data: object, accepted_media_type: str | None = None, renderer_context: dict | None = None
    ) -> bytes:
        return json.dumps(data).encode()  # errors (401, 404) before the stream starts


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _snapshot(job: Job) -> dict:
    fields = ("status", "progress", "progress_message", "result", "error")
    return {name: getattr(job, name) for name in fields}


def job_events(job: Job, offset: int) -> Iterator[str]:
    """`status` first, the stored log from `offset`, an AI job's text so far, then live `log`,
    `progress`, `status` and `text` events until the job is final: then `end` with its last state."""
    with live.subscription(job.pk) as subscription:  # subscribe before reading, so nothing falls between
        job.refresh_from_db()
        yield sse("status", _snapshot(job))
        while True:
            text, end = logs.read(job, offset, LOG_PAGE_BYTES)
            if not text:
                break
            yield sse("log", {"offset": offset, "text": text})
            offset = end
        # (attempt, bytes) of generated text already sent; a live piece starting before that is not new.
        text_sent = (job.attempts, 0)
        generating = job.kind == "ai_generate" and job.status == Job.Status.RUNNING
        if generating and (so_far := live.text_so_far(job.pk, job.attempts)):
            yield sse("text", {"attempt": job.attempts, "offset": 0, "delta": so_far})
            text_sent = (job.attempts, len(so_far.encode()))
        quiet_since = time.monotonic()
        while not job.is_final:
            message = subscription.get_message(timeout=1.0)
            if message is None:
                job.refresh_from_db()  # the row is the truth: this catches a status event that was missed
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                continue
            event = json.loads(message["data"])
            kind = event.pop("type", "message")
            if kind == "log":
                if event["offset"] < offset:
                    continue  # already sent from the stored log
                offset = event["offset"] + len(event["text"].encode())
            elif kind == "text" and event["attempt"] == text_sent[0] and event["offset"] < text_sent[1]:
                continue  # already sent with the text so far
            quiet_since = time.monotonic()
            yield sse(kind, event)
            if kind == "status":
                job.refresh_from_db()
        yield sse("end", _snapshot(job))


@extend_schema(
    parameters=[OpenApiParameter("offset", int, description="Start the log from this byte (default 0).")],
    responses={(200, "text/event-stream"): OpenApiTypes.STR},
)
@api_view(["GET"])
@renderer_classes([EventStreamRenderer, JSONRenderer])
@throttle_classes([ReadThrottle])
def job_stream(request: Request, pk: str) -> StreamingHttpResponse:
    """Server-Sent Events: `status`, `log`, `progress`, ... until the job is final, then `end`."""
    job = _job(request, pk)
    raw = request.query_params.get("offset", "0")
    offset = int(raw) if raw.isdigit() else 0
    response = StreamingHttpResponse(job_events(job, offset), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response


@extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
@api_view(["GET"])
@throttle_classes([ReadThrottle])
def job_artifact(request: Request, pk: str, name: str) -> FileResponse:
    job = _job(request, pk)
    artifact = get_object_or_404(Artifact, job=job, name=name)
    return FileResponse(artifact.file.open("rb"), as_attachment=True, filename=name.rsplit("/", 1)[-1])


UPLOAD_OUT = inline_serializer(
    "Upload", {"id": serializers.UUIDField(), "size": serializers.IntegerField(), "sha256": serializers.CharField()}
)


class UploadParser(MultiPartParser):
    def parse(self, stream: object, media_type: str | None = None, parser_context: dict | None = None) -> object:
        # The multipart envelope around the file takes a little room of its own.
        limit = settings.UPLOAD_MAX_BYTES + 64 * 1024
        refuse_declared_over(parser_context, limit, f"Uploads are limited to {settings.UPLOAD_MAX_BYTES} bytes.")
        return super().parse(stream, media_type, parser_context)


@extend_schema(
    request={"multipart/form-data": inline_serializer("UploadIn", {"file": serializers.FileField()})},
    responses={
        201: inline_serializer(
            "Upload",
            {"id": serializers.UUIDField(), "size": serializers.IntegerField(), "sha256": serializers.CharField()},
        )
    },
)
@api_view(["POST"])
@parser_classes([UploadParser])
@throttle_classes([SubmitThrottle])
def upload(request: Request) -> Response:
    """A source archive (tar.gz or zip) for `{"source": {"upload": id}}`; checked now, kept until used."""
    file = request.FILES.get("file")
    if file is None:
        raise ValidationError({"file": ["No file was submitted (multipart field 'file')."]})
    if file.size > settings.UPLOAD_MAX_BYTES:
        raise RequestTooLarge(f"Uploads are limited to {settings.UPLOAD_MAX_BYTES} bytes.")
    try:
        saved = services.save_upload(request.user, file)
    except ArchiveError as exc:
        raise ValidationError({"file": [str(exc)]}) from exc
    return Response({"id": saved.id, "size": saved.size, "sha256": saved.sha256}, status=status.HTTP_201_CREATED)
