"""Build artifacts: kept through Django's storage API after the work directory is gone."""

import hashlib
from pathlib import Path, PurePosixPath

from django.core.files import File
from django.db.models import QuerySet
from django.urls import reverse

from apps.jobs.models import Artifact, Job


def store(job: Job, name: str, path: Path) -> Artifact:
    """Save the file at `path` as the job's artifact `name`, replacing one of an earlier attempt."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    _delete(Artifact.objects.filter(job=job, name=name))
    artifact = Artifact(job=job, name=name, size=size, sha256=digest.hexdigest())
    with open(path, "rb") as f:
        artifact.file.save(PurePosixPath(name).name, File(f), save=True)
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
