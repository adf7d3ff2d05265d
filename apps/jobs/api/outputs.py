"""What a job produces, read through the API: its log, its live event stream, its artifacts; and
source uploads for build, test and lint jobs."""

from django.conf import settings
from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import api_view, parser_classes, throttle_classes
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import logs, services
from apps.jobs.api.parsers import OffsetError, RequestTooLarge, parse_offset, refuse_declared_over
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
    try:
        offset = parse_offset(request.query_params.get("offset"))
    except OffsetError as exc:
        raise ValidationError({"offset": [str(exc)]}) from None
    text, end = logs.read(job, offset, LOG_PAGE_BYTES)
    complete = job.is_final and end >= logs.end_offset(job.pk)
    return Response({"offset": end, "text": text, "complete": complete})


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
