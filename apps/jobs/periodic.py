"""Periodic jobs: a `JobTemplate` submitted on a crontab or interval schedule of django-celery-beat.

Beat runs them in its own process (`apps.jobs.scheduler`), as it promotes scheduled jobs: no worker
slot is waited for, and the job is submitted at its period's time, through the API's validation and
the same row-first path as `POST /api/jobs/`. Any other Celery beat may run them too, through the
`conveyor.run_template` task.

One job per period, whatever runs: the job's idempotency key is `periodic:<template>:<period start>`,
so a second beat, a beat restarted within the period, or the task delivered twice finds the period's
job and creates nothing.

Periods: a crontab's period starts at its latest tick (in its time zone); an interval's periods are
aligned on `start_time` (else the Unix epoch: every hour starts on the hour, UTC), and beat is kept on
those boundaries, so it does not drift. Missed periods (beat was down) are not caught up one by one:
the latest one runs once, when beat is back, and the schedule goes on from there.
"""

import json
import logging
import math
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from rest_framework.exceptions import APIException, PermissionDenied, Throttled

from apps.jobs import services
from apps.jobs.models import Job, JobTemplate

log = logging.getLogger(__name__)

RUN_TEMPLATE = "conveyor.run_template"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Beat may wake a little before its due time: a time this close to a period's start counts in it.
EARLY_TOLERANCE_SECONDS = 0.5
# How far back a crontab's latest tick is looked for (a "29 February on a Monday" comes back rarely).
CRON_LOOKBACK_DAYS = 366 * 30


def interval_seconds(interval: Any) -> float:
    return timedelta(**{interval.period: interval.every}).total_seconds()


def latest_tick(crontab: Any, now: datetime) -> datetime | None:
    """The latest time at or before `now` that the crontab (django-celery-beat's model) matches, in
    its time zone, with Celery's rules (day of month and day of week must both match)."""
    cron = crontab.schedule  # Celery's crontab: the sets of minutes, hours, days...
    zone = crontab.timezone
    now = now.astimezone(UTC)
    hours, minutes = sorted(cron.hour, reverse=True), sorted(cron.minute, reverse=True)
    day = now.astimezone(zone).date()
    for _ in range(CRON_LOOKBACK_DAYS):
        if (
            day.month in cron.month_of_year
            and day.day in cron.day_of_month
            and day.isoweekday() % 7 in cron.day_of_week  # Celery counts from Sunday = 0
        ):
            ticks = [tick for hour in hours for minute in minutes for tick in _instants(day, hour, minute, zone)]
            if past := [tick for tick in ticks if tick <= now]:  # compared in UTC, not by wall clock
                return max(past)
        day -= timedelta(days=1)
    return None


def _instants(day: Any, hour: int, minute: int, zone: Any) -> list[datetime]:
    """The instants (UTC) a wall-clock time of `zone` names on `day`: none in a gap where the clocks
    went forward, two in an hour the clocks went back over."""
    found = set()
    for fold in (0, 1):
        local = datetime.combine(day, time(hour, minute), tzinfo=zone).replace(fold=fold)
        instant = local.astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):  # it exists
            found.add(instant)
    return sorted(found)


def period_of(schedule: Any, now: datetime) -> datetime | None:
    """The start of the period `now` falls in, for a template or its PeriodicTask (both have
    `crontab`, `interval` and `start_time`); None before the first period."""
    if schedule.crontab_id:
        return latest_tick(schedule.crontab, now + timedelta(seconds=EARLY_TOLERANCE_SECONDS))
    if schedule.interval_id:
        every = interval_seconds(schedule.interval)
        anchor = schedule.start_time or EPOCH
        tolerance = min(EARLY_TOLERANCE_SECONDS, every / 4)
        periods = math.floor(((now - anchor).total_seconds() + tolerance) / every)
        return anchor + timedelta(seconds=periods * every) if periods >= 0 else None
    return None


def idempotency_key(template: JobTemplate, period: datetime) -> str:
    return f"periodic:{template.pk}:{period.astimezone(UTC).isoformat()}"


def submission(template: JobTemplate) -> dict[str, Any]:
    """What the template submits, as a client would post it."""
    data: dict[str, Any] = {"kind": template.kind, "payload": template.payload, "priority": template.priority}
    if template.max_attempts:
        data["max_attempts"] = template.max_attempts
    if template.timeout_seconds:
        data["timeout_seconds"] = template.timeout_seconds
    if template.callback_url:
        data["callback_url"] = template.callback_url
    return data


def refusal(template: JobTemplate) -> dict[str, Any] | None:
    """Why the API would refuse the template's job today (field -> reasons), or None. The admin
    shows it when the template is saved; a template refused later (its owner lost a permission, a
    kind's schema changed) records it in `last_error` at each period."""
    if not template.owner_id or not template.owner.is_active:
        return {"owner": ["The owner must be an active user."]}
    try:
        services.validated_as(template.owner, submission(template))
    except services.SubmissionRefused as exc:
        return exc.errors
    except Throttled:  # today's token budget is spent: tomorrow's periods may run
        return None
    except PermissionDenied as exc:  # a permission the owner lacks (a high priority)
        return {"priority": [str(exc.detail)]}
    except APIException as exc:  # too large, say
        return {"payload": [str(exc.detail)]}
    return None


def run(template_id: int, now: datetime | None = None) -> Job | None:
    """Submit the template's job for the period `now` falls in, unless it was submitted already.
    Returns the period's job (new or found), or None: no such template, disabled, before its first
    period, or refused (the reason logged and kept in `last_error`)."""
    template = JobTemplate.objects.select_related("owner", "crontab", "interval").filter(pk=template_id).first()
    if template is None or not template.enabled:
        return None
    now = now or timezone.now()
    period = period_of(template, now)
    if period is None or (template.start_time and now < template.start_time):
        return None
    data = {**submission(template), "idempotency_key": idempotency_key(template, period)}
    try:
        job, created = services.submit_as(template.owner.username, data)
    except (services.SubmissionRefused, APIException) as exc:
        reason = json.dumps(getattr(exc, "errors", None) or getattr(exc, "detail", str(exc)), default=str)
        log.warning("periodic job %r: period %s refused: %s", template.name, period.isoformat(), reason)
        JobTemplate.objects.filter(pk=template.pk).update(last_period=period, last_job=None, last_error=reason[:2000])
        return None
    if created:
        log.info("periodic job %r: job %s for the period from %s", template.name, job.pk, period.isoformat())
    JobTemplate.objects.filter(pk=template.pk).update(last_period=period, last_job=job.pk, last_error="")
    return job


def clean(template: JobTemplate) -> None:
    """The checks of a template before it is saved (the admin's form calls this through the model)."""
    if template.crontab_id and template.interval_id:
        raise ValidationError({"interval": "Set a crontab or an interval, not both."})
    if template.enabled and not (template.crontab_id or template.interval_id):
        raise ValidationError({"crontab": "An enabled template needs a crontab or an interval."})
    if template.interval_id and interval_seconds(template.interval) < 1:
        raise ValidationError({"interval": "The interval must be at least one second."})
    if problems := refusal(template):
        fields = {"kind", "payload", "priority", "max_attempts", "timeout_seconds", "callback_url", "owner"}
        errors: dict[str, list[str]] = {}
        for name, why in problems.items():
            errors.setdefault(name if name in fields else "payload", []).extend(str(r) for r in _flat(why))
        raise ValidationError(errors)


def _flat(reasons: Any) -> list[Any]:
    if isinstance(reasons, dict):
        return [f"{key}: {value}" for key, values in reasons.items() for value in _flat(values)]
    if isinstance(reasons, list):
        return [reason for item in reasons for reason in _flat(item)]
    return [reasons]


def sync(template: JobTemplate) -> None:
    """Keep the template's PeriodicTask (what beat reads) as the template says; beat notices the
    change within a tick (django-celery-beat's change marker)."""
    with transaction.atomic():
        task = template.periodic_task or PeriodicTask(task=RUN_TEMPLATE)
        task.name = f"conveyor template {template.pk}: {template.name}"[:200]
        task.task = RUN_TEMPLATE
        task.args = json.dumps([template.pk])
        task.kwargs = "{}"
        task.crontab, task.interval = template.crontab, template.interval
        task.start_time = template.start_time
        task.enabled = template.enabled and bool(template.crontab_id or template.interval_id)
        task.description = f"Submits a {template.kind} job for {template.owner} (Conveyor job template)."
        if not (template.crontab_id or template.interval_id):
            if task.pk:
                task.delete()
            return
        task.save()
        if template.periodic_task_id != task.pk:
            template.periodic_task = task
            JobTemplate.objects.filter(pk=template.pk).update(periodic_task=task)


def forget(template: JobTemplate) -> None:
    """A deleted template takes its PeriodicTask with it."""
    if template.periodic_task_id:
        PeriodicTask.objects.filter(pk=template.periodic_task_id).delete()
