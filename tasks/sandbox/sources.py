"""Fetching a job's source tree into its work directory: inline files, an upload, or a git ref."""

import os
import re
from pathlib import Path

from apps.jobs.archives import ArchiveError, extract, write_files
from apps.jobs.errors import PermanentError, RetryableError
from apps.jobs.models import Job, Upload
from tasks.joblog import JobLog
from tasks.sandbox import Output, Workspace, run_process

# What git prints when the repository or ref does not exist: another attempt would not help.
MISSING = re.compile(
    r"couldn't find remote ref|not our ref|repository '.*' not found|does not appear to be a git repository"
    r"|Could not read from remote repository|unable to find|invalid refspec|not a valid object name",
    re.IGNORECASE,
)


class Captured(Output):
    """Keeps a command's output for an error message while passing it to the job's log."""

    def __init__(self, log: JobLog) -> None:
        self.log = log
        self.text = ""

    def write(self, data: bytes) -> None:
        self.text = (self.text + data.decode(errors="replace"))[-4000:]
        self.log.write(data)

    def tick(self) -> None:
        self.log.tick()


def fetch(job: Job, workspace: Workspace, log: JobLog) -> None:
    source = job.payload["source"]
    try:
        if "files" in source:
            write_files(source["files"], workspace.src)
        elif "upload" in source:
            upload = Upload.objects.filter(pk=source["upload"], owner_id=job.owner_id).first()
            if upload is None:
                raise PermanentError(f"upload {source['upload']} no longer exists")
            with upload.file.open("rb") as f:
                extract(f, workspace.src)
        else:
            clone(source["git"]["url"], source["git"]["ref"], workspace, log)
    except ArchiveError as exc:
        raise PermanentError(f"source refused: {exc}") from exc


def clone(url: str, ref: str, workspace: Workspace, log: JobLog) -> None:
    """A shallow fetch of one ref (branch, tag or commit) and a checkout of it."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workspace.root / "home"),
        "LANG": "C",
        "GIT_TERMINAL_PROMPT": "0",  # never wait for a password
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    steps = [
        ["git", "init", "-q", "."],
        ["git", "fetch", "--depth", "1", "--no-tags", "--", url, ref],
        ["git", "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"],
    ]
    for argv in steps:
        log.line(f"$ {' '.join(argv)}")
        captured = Captured(log)
        code = run_process(argv, captured, cwd=Path(workspace.src), env=env)
        if code == 0:
            continue
        detail = captured.text.strip().splitlines()[-1] if captured.text.strip() else f"exit code {code}"
        if MISSING.search(captured.text):
            raise PermanentError(f"git: cannot fetch {ref!r} from {url}: {detail}")
        raise RetryableError(f"git: fetching {ref!r} from {url} failed: {detail}")
