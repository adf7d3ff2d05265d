"""What build, test and lint jobs share: a work directory, the source, the sandboxed command, its
log, and artifacts. Each kind's module adds its default command and how it reads the tool's report.
"""

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from django.conf import settings

from tasks.context import Context
from tasks.sandbox import sources
from tasks.sandbox.confinement import capabilities
from tasks.sandbox.files import JobTree, glob_match, may_match_below
from tasks.sandbox.joblog import JobLog
from tasks.sandbox.runner import LimitExceeded, run_command
from tasks.sandbox.workspace import Workspace


@dataclass
class ToolRun:
    ctx: Context
    workspace: Workspace
    log: JobLog

    @property
    def command(self) -> list[str] | None:
        return self.ctx.job.payload.get("command")

    def note(self, text: str) -> None:
        self.log.line(f"[conveyor] {text}")

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Run `argv` in the sandbox with the job's own `env` (and `env`, the kind's additions)."""
        self.ctx.report(20, "running")
        self.log.line(f"$ {shlex.join(argv)}")
        code = run_command(
            argv,
            self.workspace,
            self.log,
            env={**self.ctx.job.payload.get("env", {}), **(env or {})},
            cpu_seconds=self.ctx.job.timeout_seconds + settings.JOBS_HARD_TIMEOUT_GRACE_SECONDS,
        )
        self.log.line(f"[conveyor] exit code {code}")
        self.ctx.report(90, "collecting results")
        return code

    def read_report(self, path: str, max_bytes: int) -> bytes | None:
        """A tool's report in the work directory (`out/junit.xml`), read without following links."""
        with JobTree(self.workspace.root, self.note) as tree:
            return tree.read(path, max_bytes)

    def collect_artifacts(self, patterns: list[str]) -> list[dict]:
        """Store the regular files of the tree that match `patterns` (`*` within a path segment,
        `**` across segments). Links, special files, hard links and files past the limits are
        skipped, with a line in the log, and never read."""
        kept: list[dict] = []
        total = 0
        wanted = partial(_any_match, patterns)
        below = partial(_any_below, patterns)
        with JobTree(self.workspace.root, self.note) as tree:
            for rel, f, size in tree.files("src", wanted, below, settings.JOB_ARTIFACTS_MAX_BYTES):
                longest = self.ctx.artifact_name_max
                if len(rel) > longest or not _is_text(rel):
                    self.note(f"not collected: {_shown(rel)} (a name must be UTF-8, at most {longest} long)")
                    continue
                if len(kept) >= settings.JOB_ARTIFACTS_MAX_FILES or total + size > settings.JOB_ARTIFACTS_MAX_BYTES:
                    self.note(
                        f"artifact limit reached ({settings.JOB_ARTIFACTS_MAX_FILES} files, "
                        f"{settings.JOB_ARTIFACTS_MAX_BYTES} bytes); {rel} was not kept"
                    )
                    continue
                total += size
                kept.append(self.ctx.keep_artifact(rel, f, size))
        self.ctx.drop_artifacts_except({a["name"] for a in kept})
        return kept


def _is_text(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, which os.scandir gives as surrogates
        return False
    return True


def _shown(name: str) -> str:
    return repr(name[:80] + "..." if len(name) > 80 else name)


def _any_match(patterns: list[str], path: str) -> bool:
    return any(glob_match(path, pattern) for pattern in patterns)


def _any_below(patterns: list[str], path: str) -> bool:
    return any(may_match_below(path, pattern) for pattern in patterns)


@contextmanager
def tool_run(ctx: Context) -> Iterator[ToolRun]:
    """A fresh work directory with the job's source in it; removed afterwards, whatever happens."""
    job = ctx.job
    log = ctx.output
    workspace = None
    try:
        # The first line goes out before the work directory is made (its disk takes tens of ms).
        log.line(f"[conveyor] attempt {job.attempt} of {job.kind} job {job.id}; sandbox: {capabilities().describe()}")
        workspace = Workspace.create()
        if workspace.slot and workspace.slot.uid is not None:
            log.line(f"[conveyor] running as uid {workspace.slot.uid} (slot {workspace.slot.number})")
        ctx.report(5, "fetching source")
        sources.fetch(job.payload["source"], workspace, log, ctx.open_upload)
        yield ToolRun(ctx, workspace, log)
    except LimitExceeded as exc:
        log.line(f"[conveyor] stopped: {exc}")
        raise
    except BaseException as exc:
        log.line(f"[conveyor] stopped: {type(exc).__name__}: {exc}".rstrip(": "))
        raise
    finally:
        log.close()
        if workspace is not None:
            workspace.remove()
