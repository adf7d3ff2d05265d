"""The browser's pages of jobs, beside the admin: a job's live page for its owner (`/jobs/<id>/`), and
the compact statuses the admin's job list polls (`/jobs/statuses/?ids=...`).

Both pages follow a job through `static/jobs/live.js`: the job page over the job's event stream
(`/api/jobs/<id>/stream/`, with the session cookie), the list by polling the statuses of the jobs it
shows, one query by primary key each time.
"""

import uuid

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from apps.jobs.models import Job

MAX_POLLED_IDS = 200  # the admin list shows 100 a page


@require_GET
@login_required
def job_page(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """A job as it runs: status, progress, log, an AI job's text, and its timeline (a user's own job;
    staff see all, as in the API: another user's job is a 404)."""
    job = get_object_or_404(Job.objects.visible_to(request.user), pk=pk)
    return render(request, "jobs/job.html", {"job": job})


@require_GET
def job_statuses(request: HttpRequest) -> JsonResponse:
    """`{"jobs": [{"id", "status", "status_display", "progress", "progress_message"}]}` of the jobs
    named in `ids` (comma-separated uuids), for staff: what the admin's job list shows of each."""
    user = request.user
    if not (user.is_authenticated and user.is_active and user.is_staff):
        return JsonResponse({"detail": "Staff only."}, status=403)
    try:
        ids = {uuid.UUID(value) for value in request.GET.get("ids", "").split(",") if value.strip()}
    except ValueError:
        return JsonResponse({"detail": "ids: comma-separated job ids."}, status=400)
    if len(ids) > MAX_POLLED_IDS:
        return JsonResponse({"detail": f"ids: at most {MAX_POLLED_IDS}."}, status=400)
    # One statement by primary key (no ordering: the page knows its rows' order).
    rows = Job.objects.filter(pk__in=ids).order_by().values_list("pk", "status", "progress", "progress_message")
    jobs = [
        {
            "id": str(pk),
            "status": status,
            "status_display": Job.Status(status).label,
            "progress": progress,
            "progress_message": message,
        }
        for pk, status, progress, message in rows
    ]
    response = JsonResponse({"jobs": jobs})
    response["Cache-Control"] = "no-store"
    return response
