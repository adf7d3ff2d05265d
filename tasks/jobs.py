"""Celery entry points. Thin: they take ids and call plain functions."""

from celery import shared_task

from apps.jobs.reconciler import reconcile as reconcile_jobs
from tasks import execution


@shared_task(name="conveyor.run_job", bind=True)
def run_job(self, job_id: str) -> str | None:
    return execution.run(job_id, task_id=self.request.id or "", worker=self.request.hostname or "")


@shared_task(name="conveyor.reconcile")
def reconcile() -> dict[str, int]:
    return reconcile_jobs()
