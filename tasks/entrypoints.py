"""Celery entry points. Thin: they take ids and call plain functions. Also what the worker says
about itself: its sandbox, at start-up in its log and on request to `/api/health/`."""

import contextlib
import logging
import threading
import uuid
from typing import Any

from celery import shared_task
from celery.concurrency.base import BasePool
from celery.signals import worker_ready, worker_shutdown
from celery.worker import state as worker_state
from celery.worker.control import control_command, inspect_command
from celery.worker.request import Request
from django.conf import settings

from apps.jobs import periodic, services, workers
from apps.jobs.dispatch import CANCEL_COMMAND, DELIVER_CALLBACK, RUN_JOB
from apps.jobs.reconciler import reconcile as reconcile_jobs
from tasks import callbacks, execution
from tasks.leases import Heartbeat
from tasks.sandbox.confinement import capabilities, sweep_slots

log = logging.getLogger(__name__)

WORKER_STATUS = "conveyor_status"
SUBMIT = "conveyor.submit"


class JobRequest(Request):
    """How Celery stops a running job (`revoke --terminate`, a cancel, a cold or soft shutdown). On
    prefork, SIGTERM to the job's pool process, as Celery does. A threads or solo pool has no process
    of its own per job (Celery would raise NotImplementedError and crash on a cold shutdown): the
    attempt is stopped in place, its provider stream cut, and it is handed back (a shutdown, not
    counted as an attempt) or ends cancelled."""

    def terminate(self, pool: Any, signal: Any = None) -> None:
        if _kills_processes(pool):
            log.info("job %s: its attempt stopped by SIGTERM to pool process %s", self.args[0], self.worker_pid)
            super().terminate(pool, signal)
        else:
            log.info("job %s: its attempt stopped in place", self.args[0])
            self._stop_in_place("stopped (terminated)")

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        if _kills_processes(pool):
            super().cancel(pool, signal, emit_retry=emit_retry)
        else:
            self._stop_in_place("the worker is shutting down")

    def _stop_in_place(self, reason: str) -> None:
        for watched in Heartbeat.watching(str(self.args[0]), self.id):
            Heartbeat.get().stop(watched, reason)


def _kills_processes(pool: Any) -> bool:
    """Whether the pool can stop one job by signalling its process (prefork does; threads and solo do
    not). Prefork sets `terminate_job` on the instance when it starts: look there, not at the class."""
    method = getattr(pool, "terminate_job", None)
    return getattr(method, "__func__", None) is not BasePool.terminate_job


@shared_task(name=RUN_JOB, bind=True, Request=JobRequest)
def run_job(self, job_id: str) -> str | None:
    return execution.run(job_id, task_id=self.request.id or "", worker=self.request.hostname or "")


def _job_id_of(task_id: str | None) -> uuid.UUID | None:
    """The job's id for a submit task: the task's id, or (an id that is not a UUID) one derived from it."""
    if not task_id:
        return None
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"conveyor.submit:{task_id}")


@shared_task(name=SUBMIT, bind=True, acks_late=True)
def submit(self: Any, kind: str, payload: dict, owner: str, **fields: Any) -> str:
    """A job submitted over the broker, by any Celery client: `celery -A project call conveyor.submit
    --kwargs '{"kind": "echo", "payload": {...}, "owner": "alice"}'` or `app.send_task(...)`. The API's
    validation and the same row-first path; the job's id is this task's id (what `celery call`
    prints), so a message delivered twice makes one job. A refused submission is logged, with why."""
    job_id = _job_id_of(self.request.id)
    try:
        job, created = services.submit_as(owner, {"kind": kind, "payload": payload, **fields}, job_id=job_id)
    except services.SubmissionRefused as exc:
        log.error("conveyor.submit %s refused: %s", self.request.id, exc)
        raise
    log.info("conveyor.submit: job %s %s", job.pk, "created" if created else "already there")
    return str(job.pk)


@shared_task(name=periodic.RUN_TEMPLATE, acks_late=True)
def run_template(template_id: int) -> str | None:
    """A periodic job's template, submitted for the current period (once per period, however often
    this runs). Conveyor's beat submits templates itself; this serves any other beat."""
    job = periodic.run(template_id)
    return str(job.pk) if job else None


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


@control_command(name=CANCEL_COMMAND, args=[("job_id", str), ("task_id", str)], signature="<job_id> <task_id>")
def _cancel_command(state: Any, job_id: str, task_id: str = "") -> dict[str, Any]:
    """Stop the running attempt of a cancelled job, if this worker runs it (the attempt's own Celery
    task, not another delivery of the job's message): see `JobRequest.terminate`."""
    for request in list(worker_state.active_requests):
        if request.name == RUN_JOB and request.id == task_id and list(request.args)[:1] == [job_id]:
            request.terminate(state.consumer.pool, signal="SIGTERM")
            return {"ok": "stopped"}
    return {"ok": "not running here"}


@worker_ready.connect
def _announce_the_worker(sender: Any, **kwargs: Any) -> None:
    """Say, every heartbeat until the worker stops, that it is alive and what it consumes (read by
    /api/health/, /api/stats/ and /metrics through `apps.jobs.workers`)."""
    queues = sorted(queue.name for queue in sender.task_consumer.queues)
    name = sender.hostname
    pool = type(sender.pool).__module__.rsplit(".", 1)[-1]
    stop = threading.Event()

    def beat() -> None:
        status = worker_status(queues) | {
            "pool": pool,
            "concurrency": sender.controller.concurrency if sender.controller else None,
        }
        while not stop.is_set():
            try:
                workers.announce(name, status | {"running": len(worker_state.active_requests)})
            except Exception:  # Redis away: said again at the next beat
                log.debug("could not announce worker %s", name, exc_info=True)
            stop.wait(settings.JOBS_HEARTBEAT_SECONDS)
        with contextlib.suppress(Exception):  # after the last announcement, never before it
            workers.withdraw(name)

    thread = threading.Thread(target=beat, name="conveyor-announce", daemon=True)

    def withdraw(**_: Any) -> None:
        stop.set()
        thread.join(timeout=5)

    worker_shutdown.connect(withdraw, weak=False)
    thread.start()


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
