"""Delivery statuses that providers report after they accepted a part (Twilio's status callbacks):
written on the part, on the job's result and its timeline, never moving a part back (callbacks arrive
out of order or twice) and never changing the job's own status."""

from django.db import transaction
from django.utils import timezone

from apps.jobs.models import Job, JobEvent
from apps.jobs.statuses import Event
from apps.messaging.models import Delivery


def report(provider_id: str, status: str, error_code: str = "") -> bool:
    """Apply a reported status; whether it moved the part forward."""
    rank = Delivery.RANK.get(status)
    if rank is None:
        return False
    with transaction.atomic():
        moved = Delivery.objects.filter(provider_id=provider_id, rank__lt=rank).update(
            status=status, rank=rank, error_code=error_code[:32], updated_at=timezone.now()
        )
        if not moved:
            return False
        delivery = Delivery.objects.get(provider_id=provider_id)
        job = Job.objects.select_for_update().filter(pk=delivery.job_id).first()
        if job is None:
            return True
        failed = status in ("undelivered", "failed")
        JobEvent.objects.create(
            job=job,
            at=timezone.now(),
            type=Event.DELIVERY,
            status=job.status,
            message=f"part {delivery.part + 1}: {status}" + (f" (error {error_code})" if error_code else ""),
            data={
                "part": delivery.part,
                "id": provider_id,
                "status": status,
                "error_code": error_code or None,
                "failed": failed,
            },
        )
        if isinstance(job.result, dict) and isinstance(job.result.get("delivered"), list):
            for item in job.result["delivered"]:
                if isinstance(item, dict) and item.get("part") == delivery.part:
                    item["status"] = status
                    if error_code:
                        item["error_code"] = error_code
            if failed:
                job.result["undelivered"] = sorted({*job.result.get("undelivered", []), delivery.part})
            Job.objects.filter(pk=job.pk).update(result=job.result)
    return True
