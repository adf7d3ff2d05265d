from celery import current_app
from django.db import connection
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import (
    api_view,
    authentication_classes,
    permission_classes,
    throttle_classes,
)
from rest_framework.request import Request
from rest_framework.response import Response

WORKER_STATUS = "conveyor_status"  # the workers' inspect command (tasks/jobs.py), named, not imported


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
            replies = current_app.control.broadcast(WORKER_STATUS, reply=True, timeout=1.0, connection=conn)
        workers = {name: status for reply in replies for name, status in reply.items()}
    except Exception as exc:
        state["broker"] = f"error: {type(exc).__name__}"
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
