"""The Celery CLI as its users expect it (`celery call conveyor.submit`, `celery purge`) and the
operators' `manage.py jobs`."""

import json
import subprocess
import sys
import uuid
from io import StringIO

import pytest
from celery import current_app
from django.core.management import CommandError, call_command

from apps.jobs.models import Job
from apps.jobs.reconciler import broker_depth
from tests.conftest import ROOT, wait_final, wait_for
from tests.factories import make_job, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def celery(process_env: dict, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "project", *argv],
        cwd=ROOT, env=process_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_celery_call_submits_a_job_whose_id_it_prints(process_env, worker) -> None:
    make_user("alice")
    kwargs = {"kind": "echo", "payload": {"message": "from the CLI"}, "owner": "alice", "priority": "high"}
    printed = celery(process_env, "call", "conveyor.submit", "--kwargs", json.dumps(kwargs)).strip()

    wait_for(lambda: Job.objects.filter(pk=printed).exists(), what="the job")
    job = wait_final(printed)
    assert (job.status, job.result, job.priority, job.owner.username) == ("succeeded", {"message": "from the CLI"},
                                                                          "high", "alice")  # fmt: skip


def test_send_task_validates_as_the_api_does_and_a_repeated_message_makes_one_job(worker) -> None:
    make_user("bob")
    refused_id, twice_id = str(uuid.uuid4()), str(uuid.uuid4())
    kwargs = {"kind": "echo", "payload": {"message": 7}, "owner": "bob"}  # a message must be text
    refused = current_app.send_task("conveyor.submit", kwargs={**kwargs, "payload": {"nope": 1}}, task_id=refused_id)
    for _ in range(2):  # the same message delivered twice
        current_app.send_task("conveyor.submit", kwargs={**kwargs, "payload": {"message": "x"}}, task_id=twice_id)

    assert (
        wait_final(wait_for(lambda: Job.objects.filter(pk=twice_id).first(), what="the job").pk).status == "succeeded"
    )
    assert Job.objects.filter(owner__username="bob").count() == 1
    assert refused.id == refused_id
    assert not Job.objects.filter(pk=refused_id).exists()


def test_celery_purge_loses_no_job(process_env, no_shared_worker, beat, tmp_path) -> None:
    owner = make_user()
    jobs = [make_job(owner, "queued") for _ in range(3)]
    wait_for(lambda: broker_depth("default") >= 3, what="the messages in the broker")
    celery(process_env, "purge", "-f", "-Q", "default")  # the messages are gone; the rows are not

    from tests.conftest import WorkerProcess

    worker = WorkerProcess(process_env, tmp_path / "worker.log")
    worker.start()
    try:
        finished = [wait_final(job.pk, timeout=60) for job in jobs]  # the reconciler published them again
    finally:
        worker.stop()
    assert [job.status for job in finished] == ["succeeded"] * 3


def run(*argv: str) -> str:
    out = StringIO()
    call_command("jobs", *argv, stdout=out)
    return out.getvalue()


def test_manage_py_jobs_for_operators(worker) -> None:
    make_user("carol")
    job_id = run("submit", "echo", "--owner", "carol", "--payload", '{"message": "hi"}').strip()
    job = wait_final(job_id)
    assert job.status == "succeeded"
    assert job_id in run("list", "--owner", "carol")
    shown = json.loads(run("show", job_id, "--json"))
    assert shown["result"] == {"message": "hi"}
    assert [e["type"] for e in shown["events"]][:2] == ["queued", "running"]

    failed = make_job(job.owner, "failed")
    assert json.loads(run("replay-dead", "--json")) == [str(failed.pk)]
    assert wait_final(failed.pk).status == "succeeded"
    with pytest.raises(CommandError, match="refused"):
        run("submit", "echo", "--owner", "carol", "--payload", '{"message": 1, "extra": true}')
    with pytest.raises(CommandError, match="no job"):
        run("show", "not-a-job")
    with pytest.raises(CommandError, match="cannot be cancelled"):
        run("cancel", job_id)
