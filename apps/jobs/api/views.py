from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle

from apps.jobs import services
from apps.jobs.api.serializers import (
    IDEMPOTENCY_KEY_MAX,
    BatchSubmitSerializer,
    JobEventSerializer,
    JobSerializer,
    JobSubmitSerializer,
)
from apps.jobs.api.throttles import ReadThrottle, SubmitThrottle
from apps.jobs.models import Job

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
        return Response(JobSerializer(services.retry_job(self.get_object())).data)
