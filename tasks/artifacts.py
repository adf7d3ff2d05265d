"""Build artifacts: kept through Django's storage API after the work directory is gone. Handlers reach
this through their context (`ctx.keep_artifact`)."""

import hashlib
import tempfile
from pathlib import PurePosixPath
from typing import BinaryIO

from django.core.files import File
from django.db.models import QuerySet
from django.urls import reverse

from apps.jobs.models import Artifact, Job

NAME_MAX = Artifact._meta.get_field("name").max_length


def store(job: Job, name: str, f: BinaryIO, size: int) -> Artifact:
    """Save `size` bytes of the open file `f` as the job's artifact `name`, replacing one of an
    earlier attempt. The file is the caller's to open safely (see `tasks.sandbox.files`)."""
    digest = hashlib.sha256()
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115 (closed below)
    with spool:
        left = size
        while left > 0 and (block := f.read(min(1 << 20, left))):
            digest.update(block)
            spool.write(block)
            left -= len(block)
        _delete(Artifact.objects.filter(job=job, name=name))
        artifact = Artifact(job=job, name=name, size=size - left, sha256=digest.hexdigest())
        spool.seek(0)
        try:
            artifact.file.save(PurePosixPath(name).name, File(spool), save=True)
        except BaseException:
            if artifact.file.name:  # stored, but its row was refused: no file without a row
                artifact.file.storage.delete(artifact.file.name)
            raise
    return artifact


def drop_others(job: Job, keep: set[str]) -> None:
    """Remove the artifacts an earlier attempt left that this one did not produce again."""
    _delete(Artifact.objects.filter(job=job).exclude(name__in=keep))


def _delete(artifacts: QuerySet[Artifact]) -> None:
    for artifact in artifacts:
        artifact.file.delete(save=False)
        artifact.delete()


def describe(artifact: Artifact) -> dict:
    return {
        "name": artifact.name,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "url": reverse("job-artifact", kwargs={"pk": artifact.job_id, "name": artifact.name}),
    }
