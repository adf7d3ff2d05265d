import json
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied, Throttled

from apps.credentials import budgets
from apps.jobs.dispatch import callback_url_problem
from apps.jobs.kinds import KINDS, shown_payload
from apps.jobs.models import Job, JobEvent, Priority
from project.parsers import RequestTooLarge

IDEMPOTENCY_KEY_MAX = 200


class JobSubmitSerializer(serializers.Serializer):
    """What a client may say about a new job. The payload is checked against its kind's schema, and
    a field this serializer does not know is an error, as in payloads: a typo is not a no-op."""

    kind = serializers.ChoiceField(
        choices=sorted(KINDS),
        error_messages={"invalid_choice": f'"{{input}}" is not a job kind; the kinds are: {", ".join(sorted(KINDS))}.'},
    )
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.NORMAL)
    payload = serializers.JSONField()
    max_attempts = serializers.IntegerField(min_value=1, max_value=25, required=False)
    timeout_seconds = serializers.IntegerField(min_value=1, required=False)
    run_at = serializers.DateTimeField(required=False, allow_null=True)
    idempotency_key = serializers.CharField(
        max_length=IDEMPOTENCY_KEY_MAX, required=False, allow_null=True, allow_blank=False
    )
    callback_url = serializers.URLField(max_length=500, required=False, allow_blank=True)
    parent = serializers.UUIDField(required=False, allow_null=True)

    def to_internal_value(self, data: object) -> dict:
        attrs = super().to_internal_value(data)  # refuses anything but a mapping
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs

    def validate_priority(self, value: str) -> str:
        """With JOBS_RESTRICT_PRIORITY, jumping the queue is a permission (`jobs.submit_critical`)."""
        if settings.JOBS_RESTRICT_PRIORITY and value in (Priority.HIGH, Priority.CRITICAL):
            request = self.context.get("request")
            user = getattr(request, "user", None)
            if user is None or not user.has_perm("jobs.submit_critical"):
                raise PermissionDenied(
                    f"A {value} priority needs the permission jobs.submit_critical (JOBS_RESTRICT_PRIORITY is on)."
                )
        return value

    def validate_timeout_seconds(self, value: int) -> int:
        if value > settings.JOBS_MAX_TIMEOUT_SECONDS:
            raise serializers.ValidationError(
                f"Ensure this value is less than or equal to {settings.JOBS_MAX_TIMEOUT_SECONDS}."
            )
        return value

    def validate_callback_url(self, value: str) -> str:
        if value and (problem := callback_url_problem(value)):
            raise serializers.ValidationError(problem)
        return value

    def validate_parent(self, value: Any) -> Job | None:
        if value is None:
            return None
        parent = Job.objects.visible_to(self.context["request"].user).filter(pk=value).first()
        if parent is None:
            raise serializers.ValidationError("No such job.")
        return parent

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        payload = attrs["payload"]
        if not isinstance(payload, dict):
            raise serializers.ValidationError({"payload": ["Expected a JSON object."]})
        limit = settings.JOBS_MAX_PAYLOAD_BYTES
        if len(json.dumps(payload, separators=(",", ":"))) > limit:
            raise RequestTooLarge(f"payload: larger than the limit of {limit} bytes.")
        try:
            attrs["payload"] = dict(self._payload_schema(attrs["kind"]).run_validation(payload))
        except serializers.ValidationError as error:
            raise serializers.ValidationError({"payload": error.detail}) from None
        if attrs["kind"] == "ai_generate" and settings.AI_USER_DAILY_TOKENS:
            self._check_budget(attrs["payload"])
        return attrs

    def _check_budget(self, payload: dict[str, Any]) -> None:
        """A job on the server's key whose owner spent today's token budget: 429 until it resets."""
        user = self.context["request"].user
        checked = self.context.setdefault("_budgets", {})  # once per provider for a whole batch
        provider = payload.get("provider") or ""
        if provider not in checked:
            checked[provider] = budgets.refusal_for_submission(user.pk, provider)
        if problem := checked[provider]:
            raise Throttled(wait=budgets.seconds_to_reset(), detail=f"Token budget: {problem}")

    def _payload_schema(self, kind: str) -> serializers.Serializer:
        """One payload serializer per kind for this request, reused by every item of a batch:
        building a serializer copies its fields, which cost more than validating the payload."""
        schemas = self.__dict__.setdefault("_payload_schemas", {})
        if kind not in schemas:
            schemas[kind] = KINDS[kind].payload_serializer(context=self.context)
        return schemas[kind]


class BatchSubmitSerializer(serializers.Serializer):
    jobs = JobSubmitSerializer(many=True, allow_empty=False)

    def to_internal_value(self, data: object) -> dict:
        # The count is checked before any item is validated: 100,000 items are refused at once.
        items = data.get("jobs") if isinstance(data, dict) else None
        if isinstance(items, list) and len(items) > settings.JOBS_MAX_BATCH:
            raise serializers.ValidationError({"jobs": [f"At most {settings.JOBS_MAX_BATCH} jobs per batch."]})
        return super().to_internal_value(data)


class UsernameField(serializers.ReadOnlyField):
    """A user as their username. (`source="owner.get_username"` would have DRF inspect the method's
    signature for every job: a sixth of the time of serializing a batch.)"""

    def to_representation(self, user: object) -> str:
        return user.get_username()


class JobSerializer(serializers.ModelSerializer):
    owner = UsernameField()

    class Meta:
        model = Job
        fields = [
            "id",
            "kind",
            "priority",
            "status",
            "payload",
            "result",
            "error",
            "progress",
            "progress_message",
            "attempts",
            "max_attempts",
            "timeout_seconds",
            "run_at",
            "idempotency_key",
            "callback_url",
            "parent",
            "dead_lettered",
            "created_at",
            "queued_at",
            "started_at",
            "finished_at",
            "worker",
            "owner",
        ]
        read_only_fields = fields

    def to_representation(self, job: Job) -> dict[str, Any]:
        """What `ModelSerializer.to_representation` makes of a job, written out: DRF's field-by-field
        path cost two thirds of a 50-job page (`tests/test_api.py` pins the two to each other)."""
        return {
            "id": str(job.id),
            "kind": job.kind,
            "priority": job.priority,
            "status": job.status,
            "payload": shown_payload(job.kind, job.payload),
            "result": job.result,
            "error": job.error,
            "progress": job.progress,
            "progress_message": job.progress_message,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "timeout_seconds": job.timeout_seconds,
            "run_at": _datetime(job.run_at),
            "idempotency_key": job.idempotency_key,
            "callback_url": job.callback_url,
            "parent": job.parent_id,  # as DRF gives a related key: rendered as a string
            "dead_lettered": job.dead_lettered,
            "created_at": _datetime(job.created_at),
            "queued_at": _datetime(job.queued_at),
            "started_at": _datetime(job.started_at),
            "finished_at": _datetime(job.finished_at),
            "worker": job.worker,
            "owner": job.owner.get_username(),
        }

    def to_representation_by_fields(self, job: Job) -> dict[str, Any]:
        """DRF's own way, field by field: the reference `to_representation` is tested against."""
        return super().to_representation(job)


def _datetime(value: datetime | None) -> str | None:
    """As DRF's DateTimeField shows a value (in the current time zone, `Z` for UTC)."""
    if value is None:
        return None
    value = timezone.localtime(value) if settings.USE_TZ else value
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class JobEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobEvent
        fields = ["at", "type", "status", "message", "data"]
        read_only_fields = fields


class PersonaSerializer(serializers.Serializer):
    name = serializers.CharField()
    system_prompt = serializers.CharField()
    avatar_url = serializers.CharField()
    model = serializers.CharField()
    temperature = serializers.FloatField(allow_null=True)
