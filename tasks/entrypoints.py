"""Celery entry points. Thin: they take ids and call plain functions. Also what the worker says
about itself: its sandbox, at start-up in its log and on request to `/api/health/`."""

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from celery.worker import state as worker_state
from celery.worker.control import control_command, inspect_command

from apps.jobs.dispatch import CANCEL_COMMAND, DELIVER_CALLBACK, RUN_JOB
from apps.jobs.reconciler import reconcile as reconcile_jobs
from tasks import callbacks, execution
from tasks.sandbox.confinement import capabilities, sweep_slots

log = logging.getLogger(__name__)

WORKER_STATUS = "conveyor_status"


@shared_task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str) -> str | None:
    return execution.run(job_id, task_id=self.request.id or "", worker=self.request.hostname or "")


@shared_task(name="conveyor.reconcile")
def reconcile() -> dict[str, int]:
    return reconcile_jobs()


@shared_task(
    name=DELIVER_CALLBACK,
    autoretry_for=(callbacks.CallbackFailed,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def deliver_callback(job_id: str) -> int | None:
    return callbacks.deliver(job_id)


def worker_status(queues: list[str]) -> dict[str, Any]:
    """What /api/health/ asks every worker: the queues it consumes and its sandbox."""
    caps = capabilities()
    return {"queues": queues, "sandbox": caps.sandbox or "none", "problem": caps.problem}


@inspect_command(name=WORKER_STATUS)
def _status_command(state: Any) -> dict[str, Any]:
    return worker_status(sorted(queue.name for queue in state.consumer.task_consumer.queues))


@control_command(name=CANCEL_COMMAND, args=[("job_id", str)], signature="<job_id>")
def _cancel_command(state: Any, job_id: str) -> dict[str, Any]:
    """Stop the running attempt of a cancelled job, if this worker runs it: in a prefork pool process
    by SIGTERM (what `revoke --terminate` does), in a threads or solo pool by interrupting it in place."""
    watched = execution.Heartbeat.watching(job_id)
    if watched is not None:
        execution.Heartbeat.get().stop(watched, "cancelled")
        return {"ok": "interrupted"}
    for request in list(worker_state.active_requests):
        if request.name == run_job.name and list(request.args)[:1] == [job_id] and request.worker_pid:
            request.terminate(state.consumer.pool, signal="SIGTERM")
            return {"ok": "terminated"}
    return {"ok": "not running here"}


@worker_ready.connect
def _say_how_jobs_are_confined(sender: Any, **kwargs: Any) -> None:
    queues = {queue.name for queue in sender.task_consumer.queues}
    if "builds" not in queues:
        return
    caps = capabilities()
    if caps.sandbox is not None and (cleared := sweep_slots(caps)):
        log.warning("sandbox: cleared %d job slot(s) that a stopped worker left behind", cleared)
    if caps.sandbox is None:
        log.error("sandbox: NONE. Build, test and lint jobs will fail on this worker: %s", caps.problem)
    elif caps.sandbox == "rlimit":
        log.warning("sandbox: %s", caps.describe())
    else:
        log.info("sandbox: %s", caps.describe())
