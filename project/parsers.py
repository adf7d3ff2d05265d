"""How the API reads a request: the JSON parser and its limits, the 413 they answer, and the `offset`
query parameter. Apart from `project/api.py` because DRF imports DEFAULT_PARSER_CLASSES while it defines
its APIView: this module must not import DRF's views (nor anything that does)."""

import io
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework import status
from rest_framework.exceptions import APIException, ParseError, ValidationError
from rest_framework.parsers import JSONParser


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body too large."
    default_code = "too_large"


def refuse_declared_over(parser_context: dict | None, limit: int, message: str) -> None:
    """413 before reading a body whose Content-Length already says it is too large."""
    request = (parser_context or {}).get("request")
    declared = request.META.get("CONTENT_LENGTH", "") if request is not None else ""
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(message)


MAX_DEPTH = 64  # of a request's JSON: deeper is no job's, and costs every reader of the payload


class LimitedJSONParser(JSONParser):
    """JSON with a cap on the body size (DRF reads the stream itself, so Django's own cap never applies)."""

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: dict | None = None,
    ) -> Any:
        limit = settings.JOBS_MAX_REQUEST_BYTES
        refuse_declared_over(parser_context, limit, f"Request body is larger than {limit} bytes.")
        body = stream.read(limit + 1) if stream is not None else b""
        if len(body) > limit:
            raise RequestTooLarge(f"Request body is larger than {limit} bytes.")
        try:
            data = super().parse(io.BytesIO(body), media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.") from None
        check_depth(data)
        return data


def check_depth(data: Any) -> None:
    """ParseError if `data` nests deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.")
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))


def offset_param(query: Mapping[str, str], name: str = "offset") -> int:
    """A position given in a query string (the job log and the event stream take a byte `offset`):
    absent or empty is 0; anything but a non-negative integer is a 400 naming the parameter, never a
    silent 0. Every endpoint that takes one reads it here."""
    raw = query.get(name)
    if raw is None or raw == "":
        return 0
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ValidationError({name: ["A non-negative integer is required."]})
    return int(raw)
