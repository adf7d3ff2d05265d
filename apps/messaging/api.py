"""`/api/conversations/`: conversations with their messages, each message's status, the jobs that
handled it and (for sent parts) the latest delivery status. Owner-scoped like jobs; staff see all."""

from django.db.models import Prefetch, QuerySet
from rest_framework import serializers, viewsets
from rest_framework.pagination import CursorPagination
from rest_framework.throttling import BaseThrottle

from apps.messaging.models import Conversation, Delivery, Message
from project.api import ReadThrottle


class ConversationMessageSerializer(serializers.ModelSerializer):
    ai_job = serializers.UUIDField(source="ai_job_id", read_only=True, allow_null=True)
    job = serializers.UUIDField(source="job_id", read_only=True, allow_null=True)
    in_reply_to = serializers.UUIDField(source="in_reply_to_id", read_only=True, allow_null=True)
    deliveries = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = ["id", "direction", "text", "subject", "status", "error", "external_id", "created_at",
                  "ai_job", "job", "in_reply_to", "deliveries"]  # fmt: skip

    def get_deliveries(self, message: Message) -> list[dict]:
        if message.direction != Message.Direction.OUT or message.job_id is None:
            return []
        by_job = self.context.setdefault("_deliveries", {})
        if message.job_id not in by_job:
            by_job[message.job_id] = [
                {"part": d.part, "id": d.provider_id, "status": d.status, "error_code": d.error_code or None}
                for d in Delivery.objects.filter(job_id=message.job_id).order_by("part")
            ]
        return by_job[message.job_id]


class ConversationSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    messages = ConversationMessageSerializer(many=True, read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "channel", "our_address", "their_address", "persona", "owner", "created_at", "updated_at",
                  "messages"]  # fmt: skip


class ConversationSummarySerializer(ConversationSerializer):
    last_message = serializers.SerializerMethodField()

    class Meta(ConversationSerializer.Meta):
        fields = [f for f in ConversationSerializer.Meta.fields if f != "messages"] + ["last_message"]

    def get_last_message(self, conversation: Conversation) -> dict | None:
        last = conversation.messages.order_by("-created_at").first()
        return ConversationMessageSerializer(last, context=self.context).data if last else None


class ConversationPagination(CursorPagination):
    ordering = "-updated_at"
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200


class ConversationViewSet(viewsets.ReadOnlyModelViewSet):
    pagination_class = ConversationPagination
    filterset_fields = ["channel"]

    def get_queryset(self) -> QuerySet[Conversation]:
        if getattr(self, "swagger_fake_view", False):
            return Conversation.objects.none()
        user = self.request.user
        found = Conversation.objects.all() if user.is_staff else Conversation.objects.filter(owner=user)
        found = found.select_related("owner")
        if self.action == "retrieve":
            found = found.prefetch_related(Prefetch("messages", Message.objects.order_by("created_at")))
        return found

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return ConversationSerializer if self.action == "retrieve" else ConversationSummarySerializer

    def get_throttles(self) -> list[BaseThrottle]:
        return [ReadThrottle()]
