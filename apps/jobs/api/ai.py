"""`POST /api/ai/generate/` (a shortcut for an ai_generate job) and `GET /api/personas/`."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import api_view, throttle_classes
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import ai, services
from apps.jobs.api.serializers import JobSerializer, JobSubmitSerializer
from apps.jobs.api.throttles import ReadThrottle, SubmitThrottle
from apps.jobs.kinds import AIGeneratePayload

JOB_FIELDS = ("priority", "max_attempts", "timeout_seconds", "run_at", "idempotency_key", "callback_url", "parent")


class PersonaSerializer(serializers.Serializer):
    name = serializers.CharField()
    system_prompt = serializers.CharField()
    avatar_url = serializers.CharField()
    model = serializers.CharField()
    temperature = serializers.FloatField(allow_null=True)


@extend_schema(request=AIGeneratePayload, responses={201: JobSerializer, 200: JobSerializer})
@api_view(["POST"])
@throttle_classes([SubmitThrottle])
def generate(request: Request) -> Response:
    """The body is the ai_generate payload, plus any job field (priority, timeout_seconds, ...).
    200 with the existing job for an identical request under way (unless `"dedupe": false`)."""
    body = request.data if isinstance(request.data, dict) else {}
    spec = {"kind": "ai_generate", "payload": {k: v for k, v in body.items() if k not in JOB_FIELDS}}
    spec.update({k: body[k] for k in JOB_FIELDS if k in body})
    submitted = JobSubmitSerializer(data=spec, context={"request": request})
    submitted.is_valid(raise_exception=True)
    validated = dict(submitted.validated_data)
    if key := request.headers.get("Idempotency-Key"):
        validated["idempotency_key"] = key[:200]
    job, created = services.submit_job(request.user, validated)
    return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@extend_schema(responses=PersonaSerializer(many=True))
@api_view(["GET"])
@throttle_classes([ReadThrottle])
def personas(request: Request) -> Response:
    return Response(PersonaSerializer([p.as_dict() for p in ai.personas().values()], many=True).data)
