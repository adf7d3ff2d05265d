"""`/api/jobs/`: submit one job or a batch, list and read them, their events, log and artifacts,
cancel and retry."""

from django.db.models import QuerySet
from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action, api_view, throttle_classes
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle

from apps.jobs import logs, services, waiting
from apps.jobs.api.serializers import (
    IDEMPOTENCY_KEY_MAX,
    BatchSubmitSerializer,
    JobEventSerializer,
    JobSerializer,
    JobSubmitSerializer,
)
from apps.jobs.models import Artifact, Job
from project.api import ReadThrottle, SubmitThrottle
from project.parsers import offset_param

LOG_PAGE_BYTES = 256 * 1024

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="Repeat it to get the first job back (200).",
)


def submit(request: Request, data: object) -> Response:
    """Validate one job submission, create it, and answer 201, or 200 with the job that an
    Idempotency-Key (or a deduplicating kind) already names."""
    submitted = JobSubmitSerializer(data=data, context={"request": request})
    submitted.is_valid(raise_exception=True)
    spec = dict(submitted.validated_data)
    if key := request.headers.get("Idempotency-Key"):
        if len(key) > IDEMPOTENCY_KEY_MAX:
            raise ValidationError({"Idempotency-Key": [f"At most {IDEMPOTENCY_KEY_MAX} characters."]})
        spec["idempotency_key"] = key
    job, created = services.submit_job(request.user, spec)
    return Response(
        JobSerializer(job).data,
        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


class JobCursorPagination(CursorPagination):
    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 500


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = JobSerializer
    pagination_class = JobCursorPagination
    filterset_fields = ["status", "kind", "priority", "dead_lettered"]

    def get_queryset(self) -> QuerySet[Job]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Job.objects.none()
        return Job.objects.visible_to(self.request.user).select_related("owner")

    def get_throttles(self) -> list[BaseThrottle]:
        return [SubmitThrottle() if self.action in ("create", "batch") else ReadThrottle()]

    def retrieve(self, request: Request, *args: object, **kwargs: object) -> Response:
        """One job; one that has not started says why it waits (`waiting_reason`)."""
        job = self.get_object()
        return Response({**self.get_serializer(job).data, "waiting_reason": waiting.reason(job)})

    @extend_schema(
        request=JobSubmitSerializer,
        responses={201: JobSerializer, 200: JobSerializer},
        parameters=[IDEMPOTENCY_HEADER],
    )
    def create(self, request: Request) -> Response:
        return submit(request, request.data)

    @extend_schema(request=BatchSubmitSerializer, responses={201: JobSerializer(many=True)})
    @action(detail=False, methods=["post"])
    def batch(self, request: Request) -> Response:
        submitted = BatchSubmitSerializer(data=request.data, context={"request": request})
        submitted.is_valid(raise_exception=True)
        jobs = services.submit_batch(request.user, submitted.validated_data["jobs"])
        return Response(
            {"jobs": JobSerializer(jobs, many=True).data},
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(responses=JobEventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str) -> Response:
        job = self.get_object()
        return Response(JobEventSerializer(job.events.all(), many=True).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        return Response(JobSerializer(services.cancel_job(self.get_object())).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str) -> Response:
        return Response(JobSerializer(services.replay_job(self.get_object())).data)


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
    offset = offset_param(request.query_params)
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
