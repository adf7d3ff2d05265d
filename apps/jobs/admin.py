import json
import uuid
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django_celery_beat.admin import PeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask

from apps.jobs import logs, services, waiting
from apps.jobs.kinds import KINDS, shown_payload
from apps.jobs.models import Job, JobEvent, JobTemplate

LOG_TAIL_BYTES = 16 * 1024
RESCHEDULABLE = ("run_at", "priority")


class JobEventInline(admin.TabularInline):
    model = JobEvent
    fields = ["at", "type", "status", "message", "data"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False  # the timeline is history: shown, never edited


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    # Both follow their jobs live (static/jobs/live.js): the job page over its event stream, the list by polling.
    change_form_template = "jobs/admin/job_change_form.html"
    change_list_template = "jobs/admin/job_change_list.html"
    list_display = [
        "id",
        "kind",
        "status",
        "priority",
        "progress_bar",
        "attempts",
        "owner",
        "created_at",
        "dead_lettered",
    ]
    list_filter = ["status", "kind", "priority", "dead_lettered", "owner"]
    search_fields = ["idempotency_key"]
    list_select_related = ["owner"]
    inlines = [JobEventInline]
    actions = ["cancel_jobs", "replay_jobs", "replay_dead_letters"]
    readonly_fields = [f.name for f in Job._meta.fields] + [
        "progress_bar",
        "outcome",
        "log_tail",
        "shown_payload",
        "waiting_reason",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "kind",
                    "status",
                    "priority",
                    "owner",
                    "progress_bar",
                    "progress_message",
                    "waiting_reason",
                ]
            },
        ),
        ("Input and outcome", {"fields": ["shown_payload", "outcome", "result", "error"]}),
        ("Output", {"fields": ["log_tail"]}),
        (
            "Attempts",
            {
                "fields": [
                    "attempts",
                    "max_attempts",
                    "timeout_seconds",
                    "dead_lettered",
                    "worker",
                    "task_id",
                ]
            },
        ),
        (
            "Times",
            {
                "fields": [
                    "created_at",
                    "run_at",
                    "queued_at",
                    "started_at",
                    "finished_at",
                    "heartbeat_at",
                ]
            },
        ),
        (
            "Other",
            {
                "fields": [
                    "idempotency_key",
                    "callback_url",
                    "parent",
                    "process",
                    "lease",
                    "handbacks",
                    "queue",
                    "redispatched_at",
                ]
            },
        ),
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs are submitted through the API, which validates them

    def get_readonly_fields(self, request: HttpRequest, obj: Job | None = None) -> list[str]:
        """A scheduled job's time and priority can be changed until it starts; nothing else."""
        if obj is not None and obj.status == Job.Status.SCHEDULED:
            return [name for name in self.readonly_fields if name not in RESCHEDULABLE]
        return self.readonly_fields

    def save_model(self, request: HttpRequest, obj: Job, form: Any, change: bool) -> None:
        if not set(form.changed_data) & set(RESCHEDULABLE):
            return
        if "priority" in form.changed_data and (problem := priority_refused(request.user, obj.priority)):
            self.message_user(request, f"Not changed: {problem}", messages.ERROR)
            return
        try:
            services.reschedule_job(obj, obj.run_at, obj.priority)
        except services.JobConflict as exc:
            self.message_user(request, f"Not changed: {exc}.", messages.WARNING)

    @admin.display(description="progress")
    def progress_bar(self, job: Job) -> str:
        return format_html(
            '<progress value="{}" max="100" title="{}"></progress> {}%',
            job.progress,
            job.progress_message,
            job.progress,
        )

    @admin.display(description="waiting")
    def waiting_reason(self, job: Job) -> str:
        return waiting.reason(job) or "-"

    @admin.display(description="payload")
    def shown_payload(self, job: Job) -> SafeString:
        """The payload as JSON, without its secrets (a webhook URL's token)."""
        shown = json.dumps(shown_payload(job.kind, job.payload), indent=2, ensure_ascii=False)
        return format_html("<pre>{}</pre>", shown)

    @admin.display(description="outcome")
    def outcome(self, job: Job) -> SafeString | str:
        """The structured result of build, test and lint jobs, as a person reads it."""
        result = job.result if isinstance(job.result, dict) else {}
        parts = []
        if result.get("tests") is not None:
            parts.append(
                format_html(
                    "<p><b>{}</b>: {} tests, {} passed, {} failed, {} errors, {} skipped in {}s</p>",
                    result["outcome"],
                    result["tests"],
                    result["passed"],
                    result["failed"],
                    result["errors"],
                    result["skipped"],
                    result["duration_s"],
                )
            )
            parts.append(_table(["test", "message"], [(f["test"], f["message"]) for f in result.get("failures", [])]))
        if "diagnostics" in result:
            parts.append(format_html("<p><b>{}</b>: {} diagnostics</p>", result["outcome"], result["count"]))
            rows = [(d["path"], d["line"], d["column"], d["code"], d["message"]) for d in result["diagnostics"]]
            parts.append(_table(["path", "line", "column", "code", "message"], rows))
        if result.get("artifacts"):
            parts.append(
                format_html(
                    "<ul>{}</ul>",
                    format_html_join(
                        "",
                        '<li><a href="{}">{}</a> ({} bytes, sha256 <code>{}</code>)</li>',
                        ((a["url"], a["name"], a["size"], a["sha256"]) for a in result["artifacts"]),
                    ),
                )
            )
        return format_html_join("", "{}", ((part,) for part in parts)) if parts else "-"

    @admin.display(description="log (last 16 KiB)")
    def log_tail(self, job: Job) -> SafeString | str:
        text = logs.tail(job, LOG_TAIL_BYTES)
        if not text:
            return "-"
        return format_html('<pre style="max-height: 40em; overflow: auto; white-space: pre-wrap">{}</pre>', text)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """Search by job id (exact) as well as by idempotency key."""
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        try:
            job_id = uuid.UUID(search_term.strip())
        except ValueError:
            return results, may_have_duplicates
        return results | queryset.filter(pk=job_id), may_have_duplicates

    def _apply(self, request: HttpRequest, jobs: QuerySet, action, verb: str) -> None:
        done, refused = 0, []
        for job in jobs:
            try:
                action(job)
                done += 1
            except services.JobConflict as exc:
                refused.append(f"{job.pk}: {exc}")
        if done:
            self.message_user(request, f"{verb} {done} job(s).", messages.SUCCESS)
        if refused:
            self.message_user(request, "Not changed: " + "; ".join(refused), messages.WARNING)

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, services.cancel_job, "Cancelled")

    @admin.action(description="Retry selected jobs (failed, timed out or cancelled)")
    def replay_jobs(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset, services.replay_job, "Re-queued")

    @admin.action(description="Replay selected dead-lettered jobs")
    def replay_dead_letters(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._apply(request, queryset.filter(dead_lettered=True), services.replay_job, "Replayed")


def _table(headers: list[str], rows: list[tuple]) -> SafeString | str:
    if not rows:
        return ""
    return format_html(
        "<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>",
        format_html_join("", "<th>{}</th>", ((h,) for h in headers)),
        format_html_join(
            "", "<tr>{}</tr>", ((format_html_join("", "<td>{}</td>", ((c,) for c in row)),) for row in rows)
        ),
    )


def priority_refused(user: Any, priority: str) -> str | None:
    """With JOBS_RESTRICT_PRIORITY, the staff member who sets a high or critical priority needs the
    permission, as a submitter would."""
    jumps = priority in (Job.Priority.HIGH, Job.Priority.CRITICAL)
    if settings.JOBS_RESTRICT_PRIORITY and jumps and not user.has_perm("jobs.submit_critical"):
        return f"a {priority} priority needs the permission jobs.submit_critical (JOBS_RESTRICT_PRIORITY is on)."
    return None


class JobTemplateForm(forms.ModelForm):
    kind = forms.ChoiceField(choices=[(name, name) for name in sorted(KINDS)])
    callback_url = forms.URLField(required=False, max_length=500, assume_scheme="https")
    editor: Any = None  # the staff member saving it (set by the admin)

    def clean(self) -> dict:
        data = super().clean()
        editor = self.editor
        owner = data.get("owner")
        if editor is not None and owner is not None and owner != editor and not editor.is_superuser:
            # the jobs run as their owner: with the owner's keys, uploads and identities
            self.add_error("owner", "Only a superuser may make or change a template of another user.")
        if editor is not None and (problem := priority_refused(editor, data.get("priority") or "")):
            self.add_error("priority", problem)
        return data

    class Meta:
        model = JobTemplate
        fields = [
            "name", "owner", "enabled", "kind", "payload", "priority", "max_attempts", "timeout_seconds",
            "callback_url", "crontab", "interval", "start_time",
        ]  # fmt: skip


@admin.register(JobTemplate)
class JobTemplateAdmin(admin.ModelAdmin):
    """Periodic jobs: what to submit, for whom, on which schedule (django-celery-beat's crontabs and
    intervals, with their time zone). Saving checks the job as the API would."""

    form = JobTemplateForm
    list_display = ["name", "kind", "owner", "schedule", "enabled", "last_period", "last_job_link", "last_error"]
    list_filter = ["enabled", "kind"]
    search_fields = ["name"]
    list_select_related = ["owner", "crontab", "interval"]
    readonly_fields = ["last_period", "last_job_link", "last_error", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "owner", "enabled"]}),
        ("Job", {"fields": ["kind", "payload", "priority", "max_attempts", "timeout_seconds", "callback_url"]}),
        ("Schedule", {"fields": ["crontab", "interval", "start_time"]}),
        ("Last period", {"fields": ["last_period", "last_job_link", "last_error", "created_at", "updated_at"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        """Staff see their own templates; superusers see all."""
        templates = super().get_queryset(request)
        return templates if request.user.is_superuser else templates.filter(owner=request.user)

    def get_changeform_initial_data(self, request: HttpRequest) -> dict:
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def get_form(self, request: HttpRequest, obj: JobTemplate | None = None, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, **kwargs)
        return type(form.__name__, (form,), {"editor": request.user})

    @admin.display(description="schedule")
    def schedule(self, template: JobTemplate) -> str:
        return str(template.crontab or template.interval or "-")

    @admin.display(description="last job")
    def last_job_link(self, template: JobTemplate) -> SafeString | str:
        if not template.last_job:
            return "-"
        url = reverse("admin:jobs_job_change", args=[template.last_job])
        return format_html('<a href="{}">{}</a>', url, template.last_job)


class SuperusersOnly:
    """A periodic task names any Celery task with any arguments (`conveyor.submit` as any user, say):
    only superusers manage them directly. Staff make periodic jobs through job templates."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


admin.site.unregister(PeriodicTask)
admin.site.register(PeriodicTask, type("PeriodicTaskAdmin", (SuperusersOnly, PeriodicTaskAdmin), {}))
