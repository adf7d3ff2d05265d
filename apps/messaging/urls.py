"""The messaging app's endpoints: the conversations API (under `api/`) and the providers' webhooks
(under `webhooks/`), both mounted by `project/urls.py`."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from apps.messaging import webhooks
from apps.messaging.api import ConversationViewSet

router = SimpleRouter()
router.register("conversations", ConversationViewSet, basename="conversation")

api_urlpatterns = router.urls

webhook_urlpatterns = [
    path("twilio/sms/", webhooks.twilio_sms, name="twilio-sms"),
    path("twilio/status/", webhooks.twilio_status, name="twilio-status"),
    path("email/", webhooks.inbound_email, name="inbound-email"),
]
