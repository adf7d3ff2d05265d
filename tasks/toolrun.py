"""What build, test and lint jobs share: a work directory, the source, the sandboxed command, its
log, and artifacts. Each kind's module adds its default command and how it reads the tool's report.
"""

import fnmatch
import os
import shlex
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from apps.jobs import artifacts
from apps.jobs.models import Job
from tasks import sources
from tasks.joblog import JobLog
from tasks.sandbox import Workspace, run_command
from tasks.types import Report


@dataclass
class ToolRun:
    job: Job
    report: Report
    workspace: Workspace
    log: JobLog

    @property
    def command(self) -> list[str] | None:
        return self.job.payload.get("command")

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Run `argv` in the sandbox with the job's own `env` (and `env`, the kind's additions)."""
        self.report(20, "running")
        self.log.line(f"$ {shlex.join(argv)}")
        code = run_command(
            argv,
            self.workspace,
            self.log,
            env={**self.job.payload.get("env", {}), **(env or {})},
            cpu_seconds=self.job.timeout_seconds + settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS,
        )
        self.log.line(f"[conveyor] exit code {code}")
        self.report(90, "collecting results")
        return code

    def collect_artifacts(self, patterns: list[str]) -> list[dict]:
        """Store the regular files of the tree that match `patterns` (`*` within a path segment,
        `**` across segments); symlinks and special files are skipped."""
        found: list[tuple[str, Path]] = []
        root = self.workspace.src
        for parent, dirs, files in os.walk(root):  # never follows symlinks
            dirs.sort()
            for name in sorted(files):
                path = Path(parent) / name
                rel = path.relative_to(root).as_posix()
                if stat.S_ISREG(path.lstat().st_mode) and any(glob_match(rel, p) for p in patterns):
                    found.append((rel, path))
        kept, total = [], 0
        for rel, path in found:
            total += path.lstat().st_size
            if len(kept) >= settings.JOB_ARTIFACTS_MAX_FILES or total > settings.JOB_ARTIFACTS_MAX_BYTES:
                self.log.line(f"[conveyor] artifact limit reached; {rel} and later files were not kept")
                break
            kept.append(artifacts.describe(artifacts.store(self.job, rel, path)))
        artifacts.drop_others(self.job, {a["name"] for a in kept})
        return kept


def glob_match(path: str, pattern: str) -> bool:
    return _match(path.split("/"), pattern.strip("/").split("/"))


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


@contextmanager
def tool_run(job: Job, report: Report) -> Iterator[ToolRun]:
    """A fresh work directory with the job's source in it; removed afterwards, whatever happens."""
    workspace = Workspace.create()
    log = JobLog(job.pk)
    try:
        log.line(f"[conveyor] attempt {job.attempts} of {job.kind} job {job.pk}, sandbox: {workspace.sandbox}")
        report(5, "fetching source")
        sources.fetch(job, workspace, log)
        workspace.hand_over()
        yield ToolRun(job, report, workspace, log)
    except BaseException as exc:
        log.line(f"[conveyor] stopped: {type(exc).__name__}: {exc}".rstrip(": "))
        raise
    finally:
        log.close()
        workspace.remove()
