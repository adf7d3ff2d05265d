"""The credentials app's endpoints, mounted under `api/` by `project/urls.py`."""

from django.urls import path
from rest_framework.routers import SimpleRouter
from rest_framework.urlpatterns import format_suffix_patterns

from apps.credentials.api import CredentialViewSet
from apps.credentials.callback_secrets import CallbackSecretView

router = SimpleRouter()
router.register("credentials", CredentialViewSet, basename="credential")

urlpatterns = [
    *format_suffix_patterns(router.urls),  # `/api/credentials.json` too, as DRF's DefaultRouter does
    path("callback-secret/", CallbackSecretView.as_view(), name="callback-secret"),
]
