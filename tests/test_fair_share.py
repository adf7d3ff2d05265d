"""Who may jump the queue, and why a job waits."""

import itertools
import time

import pytest
from django.contrib.auth.models import Permission, User

from apps.credentials import budgets
from apps.credentials.models import TokenUsage
from apps.jobs import lifecycle, reconciler, workers
from apps.jobs.models import Job
from tasks.context import Context
from tests.conftest import WorkerProcess, client_for, wait_final, wait_for
from tests.factories import make_credential, make_job, make_user, submit

pytestmark = pytest.mark.django_db(transaction=True)


def test_with_restricted_priority_high_and_critical_need_the_permission(settings, api, user) -> None:
    settings.JOBS_RESTRICT_PRIORITY = True
    for priority in ("high", "critical"):
        refused = submit(api, "echo", {"message": "x"}, priority=priority, expect=403)
        assert "jobs.submit_critical" in refused["detail"]
        batch = api.post("/api/jobs/batch/", {"jobs": [{"kind": "echo", "payload": {"message": "x"},
                                                         "priority": priority}]}, format="json")  # fmt: skip
        assert batch.status_code == 403
    assert submit(api, "echo", {"message": "x"}, priority="normal")["priority"] == "normal"

    trusted = make_user()
    trusted.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    assert submit(client_for(trusted), "echo", {"message": "x"}, priority="critical")["priority"] == "critical"
    settings.JOBS_RESTRICT_PRIORITY = False
    assert submit(api, "echo", {"message": "x"}, priority="critical")["priority"] == "critical"  # off: as before


@pytest.mark.usefixtures("no_shared_worker")  # nothing takes the jobs: they stay where they wait
def test_a_waiting_job_says_why(api, user) -> None:
    scheduled = make_job(user, "scheduled")
    assert api.get(f"/api/jobs/{scheduled.pk}/").json()["waiting_reason"].startswith("scheduled for ")

    first = submit(api, "echo", {"message": "1"})
    assert api.get(f"/api/jobs/{first['id']}/").json()["waiting_reason"] == "no worker consumes queue default"

    workers.announce("listening@test", {"queues": ["default"]})  # a worker that consumes it (busy)
    try:
        second = submit(api, "echo", {"message": "2"})
        urgent = submit(api, "echo", {"message": "3"}, priority="critical")
        reasons = {job["id"]: api.get(f"/api/jobs/{job['id']}/").json()["waiting_reason"]
                   for job in (first, second, urgent)}  # fmt: skip
    finally:
        workers.withdraw("listening@test")
    assert reasons[urgent["id"]] == "next in queue default"  # critical goes first
    assert reasons[first["id"]] == "behind 1 job(s) in queue default"
    assert reasons[second["id"]] == "behind 2 job(s) in queue default"
    finished = make_job(user, "succeeded")
    assert api.get(f"/api/jobs/{finished.pk}/").json()["waiting_reason"] is None


def _claim(job_id: object) -> Job | None:
    return lifecycle.claim(job_id, task_id="t", worker="w@test", process="test:1")


def _held(owner: User) -> list[str]:
    return [str(pk) for pk in Job.objects.filter(owner=owner, held_at__isnull=False).values_list("pk", flat=True)]


@pytest.mark.usefixtures("no_shared_worker")
def test_a_users_jobs_over_the_cap_are_held_and_let_go_in_priority_order(settings, api, user) -> None:
    settings.JOBS_USER_CONCURRENCY = {"*": 2}
    batch = api.post("/api/jobs/batch/", {"jobs": [{"kind": "echo", "payload": {"message": str(i)}}
                                                   for i in range(5)]}, format="json").json()  # fmt: skip
    ids = [job["id"] for job in batch["jobs"]]
    urgent = submit(api, "echo", {"message": "urgent"}, priority="critical")["id"]
    assert sorted(_held(user)) == sorted([*ids[2:], urgent])  # a new job does not overtake held ones
    reason = api.get(f"/api/jobs/{ids[2]}/").json()["waiting_reason"]
    assert reason == "user concurrency limit: 0 of 2 of the owner's jobs running in queue default"
    assert [_claim(pk).status for pk in ids[:2]] == ["running", "running"]

    lifecycle.succeed(Job.objects.get(pk=ids[0]), {"message": "0"})  # a slot frees: the critical goes
    assert Job.objects.get(pk=urgent).held_at is None
    assert sorted(_held(user)) == sorted(ids[2:])
    assert _claim(urgent).status == "running"
    lifecycle.cancel(ids[1])
    assert sorted(_held(user)) == sorted(ids[3:])  # the oldest of the rest


@pytest.mark.usefixtures("no_shared_worker")
def test_a_claim_over_the_cap_holds_the_job_until_a_slot_frees(settings, user) -> None:
    first, second = make_job(user), make_job(user)  # both let go (no cap yet): as two racing submissions
    settings.JOBS_USER_CONCURRENCY = {"default": 1}
    assert _claim(first.pk).status == "running"
    assert _claim(second.pk) is None
    second.refresh_from_db()
    assert (second.status, second.held_at is not None) == ("queued", True)
    lifecycle.succeed(Job.objects.get(pk=first.pk), {})
    second.refresh_from_db()
    assert second.held_at is None
    assert _claim(second.pk).status == "running"


@pytest.mark.usefixtures("no_shared_worker")
def test_the_reconciler_lets_go_of_held_jobs_once_the_cap_is_lifted(settings, api, user) -> None:
    settings.JOBS_USER_CONCURRENCY = {"*": 1}
    for i in range(3):
        submit(api, "echo", {"message": str(i)})
    assert len(_held(user)) == 2
    settings.JOBS_USER_CONCURRENCY = {}
    assert reconciler.reconcile()["released"] == 2
    assert _held(user) == []


def test_one_users_backlog_does_not_starve_another_users_job(
    settings, no_shared_worker, process_env, tmp_path, api, user
) -> None:
    """Alice submits 40 jobs of half a second, then Bob one: with a cap of one running job per user
    and two worker slots, Bob's starts at once, not after Alice's backlog (10 s on two slots)."""
    settings.JOBS_USER_CONCURRENCY = {"*": 1}
    worker = WorkerProcess({**process_env, "JOBS_USER_CONCURRENCY": "1"}, tmp_path / "worker.log")
    worker.start()
    bob = make_user("bob")
    try:
        jobs = [{"kind": "echo", "payload": {"message": str(i), "sleep_ms": 500}} for i in range(40)]
        assert api.post("/api/jobs/batch/", {"jobs": jobs}, format="json").status_code == 201
        wait_for(lambda: Job.objects.filter(owner=user, status="running").exists(), what="alice's first job")
        submitted = submit(client_for(bob), "echo", {"message": "bob's"})
        bobs = wait_final(submitted["id"], timeout=30)
        waited = (bobs.started_at - bobs.created_at).total_seconds()
        assert bobs.status == "succeeded"
        assert waited < 3, f"bob's job waited {waited:.1f}s"
        assert Job.objects.filter(owner=user, status__in=["queued", "running"]).count() > 20  # still running
    finally:
        for job in Job.objects.filter(owner=user, status__in=["queued", "running"]):
            lifecycle.cancel(job.pk)
        worker.stop()
    alices = Job.objects.filter(owner=user, started_at__isnull=False)
    moments = sorted([(j.started_at, 1) for j in alices] + [(j.finished_at, -1) for j in alices if j.finished_at])
    at_once = max(itertools.accumulate(step for _, step in moments))
    assert at_once == 1, "alice ran more than one job at once"


def test_a_daily_token_budget_limits_the_servers_keys_not_the_users_own(
    settings, no_shared_worker, process_env, tmp_path, api, user, llm
) -> None:
    """Each generation of the local provider uses 9 tokens (5 in, 4 out); the budget is 15 a day."""
    settings.AI_USER_DAILY_TOKENS = 15
    worker = WorkerProcess({**process_env, "AI_USER_DAILY_TOKENS": "15"}, tmp_path / "worker.log")
    worker.start()
    request = {"provider": "openai", "dedupe": False}
    try:
        first = wait_final(submit(api, "ai_generate", {**request, "prompt": "one"})["id"], timeout=30)
        assert first.status == "succeeded", first.error
        assert budgets.used_today(user.pk) == 9
        second = wait_final(submit(api, "ai_generate", {**request, "prompt": "two"})["id"], timeout=30)
        assert second.status == "succeeded", second.error  # started at 9 of 15: it may finish over
        assert budgets.used_today(user.pk) == 18

        refused = api.post("/api/jobs/", {"kind": "ai_generate", "payload": {**request, "prompt": "3"}}, format="json")
        assert refused.status_code == 429
        assert "daily budget of 15 tokens" in refused.json()["detail"]
        assert 0 < int(refused["Retry-After"]) <= 86400

        queued_before = make_job(user, "queued", kind="ai_generate", payload={"prompt": "4", "provider": "openai"})
        late = wait_final(queued_before.pk, timeout=30)  # submitted before the budget was spent
        assert (late.status, late.error["type"]) == ("failed", "PermanentError"), late.error
        assert "daily budget of 15 tokens" in late.error["message"]
        calls = len(llm.requests)

        make_credential(user, "openai", "sk-user-own-0123456789")  # the user's own key: no budget
        own = wait_final(submit(api, "ai_generate", {**request, "prompt": "five"})["id"], timeout=30)
        assert own.status == "succeeded", own.error
        assert llm.requests[-1].key == "sk-user-own-0123456789"
        assert len(llm.requests) == calls + 1
        assert budgets.used_today(user.pk) == 18
        assert TokenUsage.objects.get(owner=user).tokens == 18
    finally:
        worker.stop()


@pytest.mark.usefixtures("no_shared_worker")
def test_a_held_job_cancelled_and_replayed_is_held_or_published_never_both(settings, api, user) -> None:
    settings.JOBS_USER_CONCURRENCY = {"*": 1}
    first, held = (submit(api, "echo", {"message": str(i)})["id"] for i in range(2))
    assert _held(user) == [held]
    lifecycle.cancel(held)
    assert Job.objects.get(pk=held).held_at is None  # a cancelled job is not held
    lifecycle.cancel(first)  # the slot frees before the replay: it is let go at once
    assert lifecycle.replay(held)
    replayed = Job.objects.get(pk=held)
    assert (replayed.status, replayed.held_at) == ("queued", None)
    assert reconciler.reconcile()["released"] == 0  # nothing held, nothing published twice


def test_a_generation_stopped_midway_counts_what_streamed(settings, user) -> None:
    settings.AI_USER_DAILY_TOKENS = 1000
    settings.OPENAI_API_KEY = "sk-server-0123456789"
    job = make_job(user, "running", kind="ai_generate", payload={"prompt": "p" * 40, "provider": "openai"})
    ctx = Context(job, lambda percent, message: None, deadline=time.monotonic() + 60)
    assert ctx.provider_key("openai") == "sk-server-0123456789"
    ctx.stream_text("x" * 400)
    ctx.count_usage(None)  # cut off: no count from the provider
    assert budgets.used_today(user.pk) == (40 + 400) // 4 + 1
    ctx.count_usage({"input_tokens": 10, "output_tokens": 5})
    assert budgets.used_today(user.pk) == (40 + 400) // 4 + 1 + 15
