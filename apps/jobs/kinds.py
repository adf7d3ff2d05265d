"""The catalogue of job kinds: payload schema, queue and defaults of each.

The API validates payloads here, without importing worker code; `tasks/` maps each kind to its
handler by the same name.
"""

from dataclasses import dataclass

from rest_framework import serializers


class PayloadSerializer(serializers.Serializer):
    """A payload schema that refuses fields it does not know, so a typo is an error, not a no-op."""

    def validate(self, attrs: dict) -> dict:
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class EchoPayload(PayloadSerializer):
    message = serializers.CharField(allow_blank=True, max_length=100_000)
    sleep_ms = serializers.IntegerField(min_value=0, max_value=3_600_000, default=0)
    fail_times = serializers.IntegerField(min_value=0, max_value=100, default=0)
    progress_steps = serializers.IntegerField(min_value=0, max_value=1_000, default=0)


@dataclass(frozen=True)
class Kind:
    name: str
    queue: str
    payload: type[PayloadSerializer]
    max_attempts: int = 3
    timeout_seconds: int = 300


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "echo",
            queue="default",
            payload=EchoPayload,
            max_attempts=3,
            timeout_seconds=60,
        ),
    )
}


def get_kind(name: str) -> Kind:
    return KINDS[name]
