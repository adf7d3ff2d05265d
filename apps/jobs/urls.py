"""The jobs app's endpoints, mounted under `api/` by `project/urls.py`."""

from django.urls import path
from rest_framework.routers import SimpleRouter
from rest_framework.urlpatterns import format_suffix_patterns

from apps.jobs.api import jobs, operations, personas, streams, uploads

router = SimpleRouter()
router.register("jobs", jobs.JobViewSet, basename="job")

urlpatterns = [
    path("uploads/", uploads.upload, name="upload"),
    path("stats/", operations.stats_view, name="stats"),
    path("ai/generate/", personas.generate, name="ai-generate"),
    path("personas/", personas.personas, name="personas"),
    path("jobs/<uuid:pk>/log/", jobs.job_log, name="job-log"),
    path("jobs/<uuid:pk>/stream/", streams.job_stream, name="job-stream"),
    path("jobs/<uuid:pk>/artifacts/<path:name>", jobs.job_artifact, name="job-artifact"),
    *format_suffix_patterns(router.urls),  # `/api/jobs.json` too, as DRF's DefaultRouter routes them
]
