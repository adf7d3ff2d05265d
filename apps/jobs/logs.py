"""A job's stored output log, read back from a byte offset (the worker appends it:
`tasks.sandbox.joblog`)."""

from uuid import UUID

from django.db.models import Max

from apps.jobs.models import Job, LogChunk


def end_offset(job_id: UUID) -> int:
    """The byte length of the log so far: where the worker's next chunk goes, and where a reader is done."""
    last = LogChunk.objects.filter(job_id=job_id).aggregate(last=Max("offset"))["last"]
    if last is None:
        return 0
    text = LogChunk.objects.filter(job_id=job_id, offset=last).values_list("text", flat=True).get()
    return last + len(text.encode())


def read(job: Job, offset: int, limit: int) -> tuple[str, int]:
    """Up to about `limit` bytes of the log from byte `offset`; returns (text, the next offset)."""
    first = (
        LogChunk.objects.filter(job=job, offset__lte=offset)
        .order_by("-offset")
        .values_list("offset", flat=True)
        .first()
    )
    chunks = LogChunk.objects.filter(job=job, offset__gte=first or 0).order_by("offset")
    parts: list[bytes] = []
    size = 0
    position = offset
    for chunk in chunks.values_list("offset", "text").iterator():
        data = chunk[1].encode()
        if chunk[0] + len(data) <= offset:
            continue
        data = data[max(0, offset - chunk[0]) :]
        if parts and size + len(data) > limit:
            break
        parts.append(data)
        size += len(data)
        position = chunk[0] + len(chunk[1].encode())
    return b"".join(parts).decode(errors="replace"), max(position, offset)


def tail(job: Job, limit: int) -> str:
    """The last `limit` bytes or so, for the admin."""
    parts: list[str] = []
    size = 0
    for text in LogChunk.objects.filter(job=job).order_by("-offset").values_list("text", flat=True).iterator():
        parts.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    data = "".join(reversed(parts)).encode()
    return data[-limit:].decode(errors="replace")
