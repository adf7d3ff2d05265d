from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from apps.messaging.models import Conversation, Delivery, DiscordWebhook, Message, OptOut


def _job_link(job_id: object) -> str:
    if not job_id:
        return "-"
    return format_html('<a href="{}">{}</a>', reverse("admin:jobs_job_change", args=[job_id]), str(job_id)[:8])


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ["created_at", "direction", "status", "text", "error", "external_id", "ai_job_link", "job_link"]
    readonly_fields = fields

    @admin.display(description="AI job")
    def ai_job_link(self, message: Message) -> str:
        return _job_link(message.ai_job_id)

    @admin.display(description="message job")
    def job_link(self, message: Message) -> str:
        return _job_link(message.job_id)

    def has_add_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["their_address", "channel", "our_address", "persona", "owner", "updated_at"]
    list_filter = ["channel"]
    search_fields = ["their_address", "our_address"]
    readonly_fields = ["channel", "our_address", "their_address", "owner", "created_at", "updated_at"]
    inlines = [MessageInline]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["provider_id", "channel", "to", "part", "status", "error_code", "job_link", "updated_at"]
    list_filter = ["channel", "status"]
    search_fields = ["provider_id", "to"]

    @admin.display(description="job")
    def job_link(self, delivery: Delivery) -> str:
        return _job_link(delivery.job_id)

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(OptOut)
class OptOutAdmin(admin.ModelAdmin):
    list_display = ["their_address", "our_address", "keyword", "created_at"]
    search_fields = ["their_address", "our_address"]


@admin.register(DiscordWebhook)
class DiscordWebhookAdmin(admin.ModelAdmin):
    list_display = ["channel_id", "webhook_id", "created_at"]
    fields = ["channel_id", "webhook_id", "created_at"]  # never the token
    readonly_fields = fields
