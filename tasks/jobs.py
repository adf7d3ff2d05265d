"""Celery entry points. Thin: they take ids and call plain functions."""

from celery import shared_task

from apps.jobs import callbacks
from apps.jobs.reconciler import reconcile as reconcile_jobs
from tasks import execution


@shared_task(name="conveyor.run_job", bind=True)
def run_job(self, job_id: str) -> str | None:
    return execution.run(job_id, task_id=self.request.id or "", worker=self.request.hostname or "")


@shared_task(name="conveyor.reconcile")
def reconcile() -> dict[str, int]:
    return reconcile_jobs()


@shared_task(
    name=callbacks.DELIVER_CALLBACK,
    autoretry_for=(callbacks.CallbackFailed,),
    retry_backoff=2,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def deliver_callback(job_id: str) -> int | None:
    return callbacks.deliver(job_id)
