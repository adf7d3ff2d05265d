"""`/api/credentials/`: a user's provider keys. `key` is write-only; answers show `last4`."""

from django.db.models import QuerySet
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from apps.credentials.models import Credential, Provider
from apps.credentials.services import store_credential
from project.api import ReadThrottle


class CredentialSerializer(serializers.ModelSerializer):
    provider = serializers.ChoiceField(choices=Provider.choices)
    key = serializers.CharField(write_only=True, min_length=8, max_length=500, trim_whitespace=True)

    class Meta:
        model = Credential
        fields = ["id", "provider", "key", "last4", "created_at", "updated_at"]
        read_only_fields = ["id", "last4", "created_at", "updated_at"]

    def validate_key(self, value: str) -> str:
        if any(c.isspace() for c in value):
            raise serializers.ValidationError("A key has no whitespace in it.")
        return value


class CredentialViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    serializer_class = CredentialSerializer
    throttle_classes = [ReadThrottle]

    def get_queryset(self) -> QuerySet[Credential]:
        if getattr(self, "swagger_fake_view", False):
            return Credential.objects.none()
        return Credential.objects.filter(owner=self.request.user).order_by("provider")

    def create(self, request: Request) -> Response:
        """Store the key for a provider (201), or replace the one stored before (200)."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        credential, created = store_credential(
            request.user, serializer.validated_data["provider"], serializer.validated_data["key"]
        )
        return Response(
            CredentialSerializer(credential).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )
