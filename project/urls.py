from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.jobs import pages
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
    # The browser's pages (session login): a job followed live, and the admin job list's statuses.
    path("jobs/statuses/", pages.job_statuses, name="job-statuses"),
    path("jobs/<uuid:pk>/", pages.job_page, name="job-page"),
    path("accounts/login/", auth_views.LoginView.as_view(template_name="jobs/login.html"), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]

handler500 = "project.api.server_error"
