"""The credentials app's endpoints, mounted under `api/` by `project/urls.py`."""

from rest_framework.routers import SimpleRouter
from rest_framework.urlpatterns import format_suffix_patterns

from apps.credentials.api import CredentialViewSet

router = SimpleRouter()
router.register("credentials", CredentialViewSet, basename="credential")

urlpatterns = format_suffix_patterns(router.urls)  # `/api/credentials.json` too, as DRF's DefaultRouter does
