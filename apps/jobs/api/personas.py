"""`GET /api/personas/` and `POST /api/ai/generate/` (a shortcut for an ai_generate job)."""

from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view, throttle_classes
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import ai_requests
from apps.jobs.api.jobs import submit
from apps.jobs.api.serializers import JobSerializer, PersonaSerializer
from apps.jobs.kinds import AIGeneratePayload
from project.api import ReadThrottle, SubmitThrottle

JOB_FIELDS = ("priority", "max_attempts", "timeout_seconds", "run_at", "idempotency_key", "callback_url", "parent")


@extend_schema(responses=PersonaSerializer(many=True))
@api_view(["GET"])
@throttle_classes([ReadThrottle])
def personas(request: Request) -> Response:
    return Response(PersonaSerializer([p.as_dict() for p in ai_requests.personas().values()], many=True).data)


@extend_schema(request=AIGeneratePayload, responses={201: JobSerializer, 200: JobSerializer})
@api_view(["POST"])
@throttle_classes([SubmitThrottle])
def generate(request: Request) -> Response:
    """The body is the ai_generate payload, plus any job field (priority, timeout_seconds, ...).
    200 with the existing job for an identical request under way (unless `"dedupe": false`)."""
    body = request.data if isinstance(request.data, dict) else {}
    spec = {"kind": "ai_generate", "payload": {k: v for k, v in body.items() if k not in JOB_FIELDS}}
    spec.update({k: body[k] for k in JOB_FIELDS if k in body})
    return submit(request, spec)
