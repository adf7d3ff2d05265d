"""The API as a whole: what every app's endpoints share (the throttles, how errors answer) and what is
no app's own (the root page, health). How a request is read is in `project/parsers.py`.

Each app routes its own resources in its `urls.py`; `project/urls.py` mounts this module's routes and
theirs under `api/`.
"""

import logging
import sys
from typing import Any

from celery import current_app
from django.conf import settings
from django.core.cache import cache as shared_cache
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views import defaults
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import api_view, authentication_classes, permission_classes, throttle_classes
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import APIRootView
from rest_framework.throttling import UserRateThrottle
from rest_framework.urlpatterns import format_suffix_patterns
from rest_framework.views import exception_handler as drf_exception_handler

from apps.jobs import workers as live_workers
from apps.jobs.services import JobConflict
from project.parsers import RequestTooLarge

log = logging.getLogger(__name__)

# Throttles --------------------------------------------------------------------------------------------
# Their counters live in the shared cache (Redis) and, while it is unreachable, in each process: a Redis
# outage must not take the API down with it, and limits still hold, per process.


class FallbackCache:
    """The default cache, or this process's own memory while the default one fails."""

    def __init__(self) -> None:
        self.local = LocMemCache("throttles", {"OPTIONS": {"MAX_ENTRIES": 100_000}})
        self.failing = False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            value = getattr(shared_cache, method)(*args, **kwargs)
        except Exception as exc:
            if not self.failing:
                log.warning("throttling: the shared cache is unreachable (%s); counting per process", exc)
                self.failing = True
            return getattr(self.local, method)(*args, **kwargs)
        if self.failing:
            log.warning("throttling: the shared cache is back")
            self.failing = False
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", key, default)

    def set(self, key: str, value: Any, timeout: Any = None) -> None:
        self._call("set", key, value, timeout)


throttle_cache = FallbackCache()


class SubmitThrottle(UserRateThrottle):
    """Submissions per user (a batch counts once). The rate is read per request, so it can be tuned live."""

    scope = "submit"
    cache = throttle_cache

    def get_rate(self) -> str:
        return settings.JOBS_SUBMIT_RATE


class ReadThrottle(UserRateThrottle):
    scope = "read"
    cache = throttle_cache

    def get_rate(self) -> str:
        return settings.JOBS_READ_RATE


# Errors -----------------------------------------------------------------------------------------------


class DatabaseUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The database is unavailable; try again shortly."
    default_code = "database_unavailable"


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: DRF's own, after mapping what the platform raises to its answer."""
    if isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    elif isinstance(exc, JobConflict):
        exc = Conflict(str(exc))
    elif isinstance(exc, OperationalError | InterfaceError):
        exc = DatabaseUnavailable()
    return drf_exception_handler(exc, context)


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's handler500: what an error outside DRF's views (a middleware, the database during
    authentication) answers. On API paths JSON, never an HTML page: 503 while the database is away."""
    if not request.path.startswith(("/api/", "/webhooks/")):
        return defaults.server_error(request)
    error = sys.exc_info()[1]
    if isinstance(error, OperationalError | InterfaceError):
        return JsonResponse({"detail": DatabaseUnavailable.default_detail}, status=503)
    return JsonResponse({"detail": "Internal server error."}, status=500)


# Health -----------------------------------------------------------------------------------------------


@extend_schema(responses={200: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT})
@api_view(["GET"])
@authentication_classes([TokenAuthentication, SessionAuthentication])
@permission_classes([])
@throttle_classes([])
def health(request: Request) -> Response:
    """200 when the database and broker answer and at least one worker replies, and every worker
    that consumes `builds` has a sandbox; else 503, naming the part that fails. Anyone may ask;
    only staff see the workers' names (a stranger learns how many there are, not the hosts)."""
    state: dict[str, object] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        state["database"] = "ok"
    except Exception as exc:
        state["database"] = f"error: {type(exc).__name__}"
    try:
        with current_app.connection_for_read() as conn:  # a new connection: a pooled one may be dead
            conn.ensure_connection(max_retries=1, timeout=2)
            state["broker"] = "ok"
    except Exception as exc:
        state["broker"] = f"error: {type(exc).__name__}"
    try:
        workers = live_workers.alive()  # each announces itself every heartbeat (apps.jobs.workers)
    except Exception:
        workers = {}
    staff = bool(getattr(request.user, "is_staff", False))
    state["workers"] = sorted(workers) if staff else len(workers)
    unconfined = {
        name: status.get("problem") or "no sandbox"
        for name, status in workers.items()
        if isinstance(status, dict) and "builds" in status.get("queues", []) and status.get("sandbox") == "none"
    }
    if not unconfined:
        state["sandbox"] = "ok"
    elif staff:
        state["sandbox"] = "; ".join(
            f"unavailable on {name}: {problem}" for name, problem in sorted(unconfined.items())
        )
    else:
        problems = sorted(set(unconfined.values()))
        state["sandbox"] = f"unavailable on {len(unconfined)} worker(s): {'; '.join(problems)}"
    healthy = state["database"] == "ok" and state["broker"] == "ok" and bool(workers) and not unconfined
    return Response(
        {"status": "ok" if healthy else "unavailable", **state},
        status=200 if healthy else 503,
    )


# Routes -----------------------------------------------------------------------------------------------
# The apps route their resources with DRF's SimpleRouter and suffix patterns (`/api/jobs.json`); the root
# page that DRF's DefaultRouter would add links each resource's list, by the name its router gives it.

RESOURCES = {"jobs": "job-list", "credentials": "credential-list"}

urlpatterns = [
    path("health/", health, name="health"),
    *format_suffix_patterns([path("", APIRootView.as_view(api_root_dict=RESOURCES), name="api-root")]),
]
