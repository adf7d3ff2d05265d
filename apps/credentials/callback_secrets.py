"""`/api/callback-secret/`: the key a user's job callbacks are signed with. `POST` makes a new one and
shows it, once (201); `GET` shows only that one exists (`last4`, `created_at`), or 404."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.credentials.models import CallbackSecret
from apps.credentials.services import new_callback_secret
from project.api import ReadThrottle


class CallbackSecretSerializer(serializers.ModelSerializer):
    class Meta:
        model = CallbackSecret
        fields = ["last4", "created_at"]
        read_only_fields = fields


class NewCallbackSecretSerializer(CallbackSecretSerializer):
    secret = serializers.CharField(
        read_only=True, help_text="Shown this once: keep it where your receiver can read it."
    )

    class Meta(CallbackSecretSerializer.Meta):
        fields = ["secret", "last4", "created_at"]
        read_only_fields = fields


class CallbackSecretView(APIView):
    throttle_classes = [ReadThrottle]

    @extend_schema(
        responses={200: CallbackSecretSerializer, 404: OpenApiResponse(description="No callback secret yet.")}
    )
    def get(self, request: Request) -> Response:
        """Whether you have a callback secret, and when it was made; never the secret."""
        row = CallbackSecret.objects.filter(owner=request.user).first()
        if row is None:
            raise NotFound("No callback secret yet: POST to make one.")
        return Response(CallbackSecretSerializer(row).data)

    @extend_schema(request=None, responses={201: NewCallbackSecretSerializer})
    def post(self, request: Request) -> Response:
        """Make a new callback secret, replacing the one before, and show it (this once)."""
        row, secret = new_callback_secret(request.user)
        data = {"secret": secret, **CallbackSecretSerializer(row).data}
        return Response(data, status=status.HTTP_201_CREATED)
