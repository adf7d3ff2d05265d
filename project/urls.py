from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.jobs.api import operations
from apps.messaging import urls as messaging

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/", include("project.api")),  # the root page and health
    path("api/", include("apps.jobs.urls")),
    path("api/", include("apps.credentials.urls")),
    path("api/", include(messaging.api_urlpatterns)),
    path("webhooks/", include(messaging.webhook_urlpatterns)),
    path("metrics", operations.metrics, name="metrics"),
]

handler500 = "project.api.server_error"
