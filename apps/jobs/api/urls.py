from django.urls import path
from rest_framework.routers import DefaultRouter

from apps.jobs.api.health import health
from apps.jobs.api.views import JobViewSet

router = DefaultRouter()
router.register("jobs", JobViewSet, basename="job")

urlpatterns = [path("health/", health, name="health"), *router.urls]
