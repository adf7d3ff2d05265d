"""Periodic jobs (job templates on django-celery-beat schedules) and scheduled jobs in the admin."""

import itertools
import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from celery import current_app
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from apps.jobs import periodic
from apps.jobs.models import Job, JobTemplate
from apps.jobs.scheduler import Scheduler
from tests.conftest import BeatProcess, WorkerProcess, wait_final, wait_for
from tests.factories import make_job, make_user


@pytest.fixture
def admin_client(client: Client) -> Client:
    client.force_login(make_user("root", superuser=True))
    return client


def every(seconds: int) -> IntervalSchedule:
    return IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)[0]


def template(owner: User, **fields: object) -> JobTemplate:
    fields = {"name": "nightly", "kind": "echo", "payload": {"message": "tick"}, **fields}
    return JobTemplate.objects.create(owner=owner, **fields)


def period_jobs(tpl: JobTemplate) -> list[Job]:
    return list(Job.objects.filter(idempotency_key__startswith=f"periodic:{tpl.pk}:").order_by("idempotency_key"))


def periods(tpl: JobTemplate) -> list[datetime]:
    return [datetime.fromisoformat(job.idempotency_key.split(":", 2)[2]) for job in period_jobs(tpl)]


def brute_force_tick(crontab: CrontabSchedule, now: datetime) -> datetime:
    """The latest matching minute, found minute by minute (the reference for `latest_tick`)."""
    cron, zone = crontab.schedule, crontab.timezone
    at = now.astimezone(zone).replace(second=0, microsecond=0)
    while True:
        if (
            at.minute in cron.minute
            and at.hour in cron.hour
            and at.day in cron.day_of_month
            and at.month in cron.month_of_year
            and at.isoweekday() % 7 in cron.day_of_week
        ):
            return at.astimezone(UTC)
        at = (at.astimezone(UTC) - timedelta(minutes=1)).astimezone(zone)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "zone"),
    [
        ({"minute": "*/15"}, "UTC"),
        ({"minute": "30", "hour": "9", "day_of_week": "1-5"}, "Europe/Paris"),
        ({"minute": "0", "hour": "2", "day_of_month": "1"}, "America/New_York"),  # 2 AM: a DST edge
    ],
)
def test_a_crontabs_period_starts_at_its_latest_tick_in_its_time_zone(fields: dict, zone: str) -> None:
    crontab = CrontabSchedule.objects.create(timezone=ZoneInfo(zone), **fields)
    rng = random.Random(7)
    for _ in range(40):
        now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(366 * 86400))
        assert periodic.latest_tick(crontab, now) == brute_force_tick(crontab, now), now


@pytest.mark.django_db
def test_an_intervals_periods_are_aligned_on_its_start_time(user: User) -> None:
    start = datetime(2026, 12, 5, 10, 0, 7, tzinfo=UTC)
    tpl = template(user, interval=IntervalSchedule.objects.create(every=10, period="minutes"), start_time=start)
    assert periodic.period_of(tpl, start - timedelta(seconds=1)) is None
    assert periodic.period_of(tpl, start + timedelta(minutes=25)) == start + timedelta(minutes=20)
    # beat waking a few milliseconds early still counts in the period it woke for
    assert periodic.period_of(tpl, start + timedelta(minutes=10, milliseconds=-10)) == start + timedelta(minutes=10)
    hourly = template(user, name="hourly", interval=IntervalSchedule.objects.create(every=1, period="hours"))
    assert periodic.period_of(hourly, datetime(2026, 12, 5, 13, 59, 2, tzinfo=UTC)) == datetime(
        2026, 12, 5, 13, tzinfo=UTC
    )


@pytest.mark.django_db
def test_running_a_template_twice_in_a_period_makes_one_job(user: User) -> None:
    tpl = template(user, interval=every(3600), priority="low", max_attempts=2)
    first = periodic.run(tpl.pk)
    again = periodic.run(tpl.pk)
    assert first is not None
    assert again is not None
    assert first.pk == again.pk
    assert [(j.kind, j.payload["message"], j.priority, j.max_attempts, j.owner) for j in period_jobs(tpl)] == [
        ("echo", "tick", "low", 2, user)
    ]
    tpl.refresh_from_db()
    assert tpl.last_job == first.pk
    assert tpl.last_error == ""
    next_hour = timezone.now() + timedelta(hours=1)
    assert periodic.run(tpl.pk, now=next_hour).pk != first.pk
    assert len(period_jobs(tpl)) == 2


@pytest.mark.django_db
def test_a_template_the_api_would_refuse_records_why_and_submits_nothing(user: User) -> None:
    tpl = template(user, interval=every(60))
    JobTemplate.objects.filter(pk=tpl.pk).update(payload={"mesage": "typo"})  # broken behind the admin's back
    assert periodic.run(tpl.pk) is None
    tpl.refresh_from_db()
    assert "payload" in tpl.last_error
    assert period_jobs(tpl) == []


@pytest.mark.django_db
def test_saving_a_template_keeps_its_periodic_task_in_step(user: User) -> None:
    tpl = template(user, interval=every(60))
    task = PeriodicTask.objects.get(pk=tpl.periodic_task_id)
    assert (task.task, json.loads(task.args), task.interval_id, task.enabled) == (
        periodic.RUN_TEMPLATE,
        [tpl.pk],
        tpl.interval_id,
        True,
    )
    tpl.enabled = False
    tpl.save()
    assert PeriodicTask.objects.get(pk=task.pk).enabled is False
    tpl.delete()
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()


@pytest.fixture
def schedulers() -> Iterator[Callable[[], Scheduler]]:
    """Beat's scheduler in this process, closed (its entries written) before the database goes."""
    made: list[Scheduler] = []

    def make() -> Scheduler:
        made.append(Scheduler(app=current_app, lazy=False))
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.close()
        scheduler._finalize.cancel()


@pytest.mark.usefixtures("no_shared_worker")  # the jobs stay as beat left them
@pytest.mark.django_db(transaction=True)
def test_two_beats_submit_each_period_once_and_skip_none(user: User, schedulers: Callable[[], Scheduler]) -> None:
    """Two schedulers of beat over one database, ticking in turn, as two beats run by mistake."""
    tpl = template(user, interval=every(1))
    beats = [schedulers(), schedulers()]
    deadline = timezone.now() + timedelta(seconds=20)
    while len(period_jobs(tpl)) < 5 and timezone.now() < deadline:
        for beat in beats:
            beat.tick()
    found = periods(tpl)
    assert len(found) >= 5
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(found)] == [1.0] * (len(found) - 1)
    assert all(job.status == Job.Status.QUEUED for job in period_jobs(tpl))


@pytest.mark.django_db(transaction=True)
def test_missed_periods_run_once_when_beat_comes_back(user: User, schedulers: Callable[[], Scheduler]) -> None:
    tpl = template(user, interval=every(60))
    down_since = timezone.now() - timedelta(minutes=10)  # beat was down for ten periods
    PeriodicTask.objects.filter(pk=tpl.periodic_task_id).update(last_run_at=down_since)
    beat = schedulers()
    for _ in range(30):  # each tick runs at most one due entry; a catch-up would run one per tick
        beat.tick()
    now = timezone.now()
    assert periods(tpl) == [periodic.period_of(tpl, now)]
    assert datetime.fromtimestamp(now.timestamp() // 60 * 60, UTC) == periods(tpl)[0]


@pytest.mark.django_db(transaction=True)
def test_beat_submits_periodic_jobs_that_workers_run(
    user: User, worker: WorkerProcess, process_env: dict, tmp_path
) -> None:
    tpl = template(user, interval=every(1))
    beats = [BeatProcess(process_env, tmp_path / name) for name in ("one", "two")]
    try:
        for beat in beats:
            beat.folder.mkdir()
            beat.start()
        wait_for(lambda: len(period_jobs(tpl)) >= 3, timeout=20, what="three periods' jobs")
    finally:
        for beat in beats:
            beat.stop()
    found = periods(tpl)
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(found)] == [1.0] * (len(found) - 1)
    assert {wait_final(job.pk).status for job in period_jobs(tpl)} == {Job.Status.SUCCEEDED}


@pytest.mark.django_db
def test_the_admin_checks_a_template_as_the_api_would(admin_client: Client, user: User) -> None:
    form = {
        "name": "reports",
        "owner": user.pk,
        "enabled": "on",
        "kind": "echo",
        "payload": json.dumps({"mesage": "typo"}),
        "priority": "normal",
        "interval": every(300).pk,
    }
    response = admin_client.post("/admin/jobs/jobtemplate/add/", form)
    assert response.status_code == 200
    assert "mesage" in response.content.decode()
    assert not JobTemplate.objects.exists()

    response = admin_client.post("/admin/jobs/jobtemplate/add/", {**form, "interval": "", "payload": "{}"})
    assert "needs a crontab or an interval" in response.content.decode()

    response = admin_client.post("/admin/jobs/jobtemplate/add/", {**form, "payload": json.dumps({"message": "hi"})})
    assert response.status_code == 302
    tpl = JobTemplate.objects.get(name="reports")
    assert PeriodicTask.objects.get(pk=tpl.periodic_task_id).interval.every == 300
    assert "reports" in admin_client.get("/admin/jobs/jobtemplate/").content.decode()


@pytest.mark.django_db
def test_the_admin_reschedules_a_scheduled_job_and_nothing_else(admin_client: Client, user: User) -> None:
    later = timezone.now() + timedelta(hours=2)
    job = make_job(user, Job.Status.SCHEDULED, run_at=timezone.now() + timedelta(hours=1))
    page = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()
    assert 'name="run_at_0"' in page
    assert 'name="payload"' not in page
    events = job.events.count()  # the timeline's management form, as the page sends it
    form = {
        "run_at_0": later.strftime("%Y-%m-%d"),
        "run_at_1": later.strftime("%H:%M:%S"),
        "priority": "high",
        "events-TOTAL_FORMS": events,
        "events-INITIAL_FORMS": events,
    }
    assert admin_client.post(f"/admin/jobs/job/{job.pk}/change/", form).status_code == 302
    job.refresh_from_db()
    assert (job.status, job.priority, job.run_at.replace(microsecond=0)) == (
        "scheduled",
        "high",
        later.replace(microsecond=0),
    )
    assert job.events.filter(type="scheduled", message__startswith="rescheduled for").exists()

    running = make_job(user, Job.Status.RUNNING)
    assert 'name="run_at_0"' not in admin_client.get(f"/admin/jobs/job/{running.pk}/change/").content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "zone", "now", "expected"),
    [
        # New York falls back at 06:00Z on 1 November 2026: 01:00-01:59 happens twice
        ({"minute": "*/15"}, "America/New_York", "2026-11-01T06:05:00Z", "2026-11-01T06:00:00Z"),
        ({"minute": "30", "hour": "1"}, "America/New_York", "2026-11-01T06:10:00Z", "2026-11-01T05:30:00Z"),
        ({"minute": "30", "hour": "1"}, "America/New_York", "2026-11-01T06:40:00Z", "2026-11-01T06:30:00Z"),
        # ... and springs forward at 07:00Z on 8 March: 02:30 does not exist that day
        ({"minute": "30", "hour": "2"}, "America/New_York", "2026-03-08T07:10:00Z", "2026-03-07T07:30:00Z"),
        ({"minute": "0", "hour": "*"}, "Europe/Paris", "2026-10-25T01:30:00Z", "2026-10-25T01:00:00Z"),
    ],
)
def test_a_crontabs_latest_tick_across_daylight_saving_changes(fields, zone, now, expected) -> None:
    crontab = CrontabSchedule.objects.create(timezone=ZoneInfo(zone), **fields)
    at = datetime.fromisoformat(now)
    assert periodic.latest_tick(crontab, at) == datetime.fromisoformat(expected)
    assert periodic.latest_tick(crontab, at) == brute_force_tick(crontab, at)


@pytest.mark.django_db(transaction=True)
def test_beat_keeps_a_template_whose_hour_is_far_away(user: User, schedulers: Callable[[], Scheduler]) -> None:
    """django-celery-beat leaves out crontabs more than two hours away; a template's must stay, so a
    period missed while beat was down runs when it is back, not a day later."""
    hour = (timezone.now().hour + 12) % 24
    tpl = template(user, crontab=CrontabSchedule.objects.create(minute="0", hour=str(hour), timezone=ZoneInfo("UTC")))
    assert tpl.periodic_task_id in {task.pk for task in schedulers().enabled_models()}


@pytest.mark.django_db
def test_staff_make_templates_for_themselves_within_their_permissions(client: Client, settings, user: User) -> None:
    settings.JOBS_RESTRICT_PRIORITY = True
    editor = make_user("editor", staff=True)
    editor.user_permissions.add(*Permission.objects.filter(codename__endswith="jobtemplate"))
    client.force_login(editor)
    form = {"name": "mine", "owner": editor.pk, "enabled": "on", "kind": "echo", "priority": "normal",
            "payload": json.dumps({"message": "hi"}), "interval": every(300).pk}  # fmt: skip
    as_other = client.post("/admin/jobs/jobtemplate/add/", {**form, "owner": user.pk})
    assert "Only a superuser may make or change a template of another user." in as_other.content.decode()
    critical = client.post("/admin/jobs/jobtemplate/add/", {**form, "priority": "critical"})
    assert "needs the permission jobs.submit_critical" in critical.content.decode()
    assert not JobTemplate.objects.exists()
    assert client.post("/admin/jobs/jobtemplate/add/", form).status_code == 302
    assert JobTemplate.objects.get().owner == editor
    assert client.get("/admin/django_celery_beat/periodictask/").status_code == 403  # superusers only
