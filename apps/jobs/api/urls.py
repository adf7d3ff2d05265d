from django.urls import path
from rest_framework.routers import DefaultRouter

from apps.credentials.api import CredentialViewSet
from apps.jobs.api import ai, outputs, streams
from apps.jobs.api.health import health
from apps.jobs.api.views import JobViewSet

router = DefaultRouter()
router.register("jobs", JobViewSet, basename="job")
router.register("credentials", CredentialViewSet, basename="credential")

urlpatterns = [
    path("health/", health, name="health"),
    path("uploads/", outputs.upload, name="upload"),
    path("ai/generate/", ai.generate, name="ai-generate"),
    path("personas/", ai.personas, name="personas"),
    path("jobs/<uuid:pk>/log/", outputs.job_log, name="job-log"),
    path("jobs/<uuid:pk>/stream/", streams.job_stream, name="job-stream"),
    path("jobs/<uuid:pk>/artifacts/<path:name>", outputs.job_artifact, name="job-artifact"),
    *router.urls,
]
