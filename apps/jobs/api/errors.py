import sys
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from apps.jobs.api.parsers import RequestTooLarge
from apps.jobs.services import JobConflict


class DatabaseUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The database is unavailable; try again shortly."
    default_code = "database_unavailable"


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's handler500: what an error outside DRF's views (a middleware, the database during
    authentication) answers. On API paths JSON, never an HTML page: 503 while the database is away."""
    if not request.path.startswith(("/api/", "/webhooks/")):
        return defaults.server_error(request)
    error = sys.exc_info()[1]
    if isinstance(error, OperationalError | InterfaceError):
        return JsonResponse({"detail": DatabaseUnavailable.default_detail}, status=503)
    return JsonResponse({"detail": "Internal server error."}, status=500)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    elif isinstance(exc, JobConflict):
        exc = Conflict(str(exc))
    elif isinstance(exc, OperationalError | InterfaceError):
        exc = DatabaseUnavailable()
    return drf_exception_handler(exc, context)
