"""Delivery statuses that providers report after they accepted a part (Twilio's status callbacks):
written on the part, on the job's result and its timeline, never moving a part back (callbacks arrive
out of order or twice) and never changing the job's own status."""

from django.db import transaction
from django.utils import timezone

from apps.jobs.models import Job, JobEvent
from apps.jobs.statuses import Event
from apps.messaging.models import Delivery, EarlyStatus


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
            if not Delivery.objects.filter(provider_id=provider_id).exists():
                _keep_early(provider_id, status, rank, error_code)
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


def _keep_early(provider_id: str, status: str, rank: int, error_code: str) -> None:
    """A status for a part not recorded yet: kept (the highest) until the part is."""
    early, created = EarlyStatus.objects.select_for_update().get_or_create(
        provider_id=provider_id, defaults={"status": status, "rank": rank, "error_code": error_code[:32]}
    )
    if not created and rank > early.rank:
        early.status, early.rank, early.error_code = status, rank, error_code[:32]
        early.save(update_fields=["status", "rank", "error_code"])


def apply_early(provider_id: str) -> bool:
    """Once a part is recorded: the status that came before it, if any (whether there was one)."""
    early = EarlyStatus.objects.filter(provider_id=provider_id).first()
    if early is None:
        return False
    report(provider_id, early.status, early.error_code)
    EarlyStatus.objects.filter(provider_id=provider_id).delete()
    return True


def sync_result(job: Job) -> None:
    """A message job that just succeeded: its result takes each part's latest status, in case a
    callback came while the handler was writing the result (called inside the success's transaction)."""
    result = job.result
    if not isinstance(result, dict) or not isinstance(result.get("delivered"), list) or result.get("duplicate_of"):
        return
    latest = {d.part: d for d in Delivery.objects.filter(job_id=job.pk)}
    changed = False
    for item in result["delivered"]:
        d = latest.get(item.get("part")) if isinstance(item, dict) else None
        if d is not None and item.get("status") != d.status:
            item["status"], changed = d.status, True
            if d.error_code:
                item["error_code"] = d.error_code
    undelivered = sorted(p for p, d in latest.items() if d.status in ("undelivered", "failed"))
    if undelivered and result.get("undelivered") != undelivered:
        result["undelivered"], changed = undelivered, True
    if changed:
        Job.objects.filter(pk=job.pk).update(result=result)
