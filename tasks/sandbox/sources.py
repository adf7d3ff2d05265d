"""Fetching a job's source tree into its work directory: inline files, an upload, or a git ref.

Git runs as hostile code would: inside the job's sandbox, as the job's uid, within the job's disk,
with a time limit. Over https it has no network of its own: a relay inside the sandbox hands its
connections, through a socket in the work directory, to a proxy in the worker that resolves each
host itself and connects only to globally routable addresses (or to hosts in
JOB_GIT_ALLOWED_HOSTS), counting the bytes received against JOB_GIT_MAX_BYTES.
"""

import os
import re
import shlex
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from django.conf import settings

from apps.jobs.archives import ArchiveError
from tasks.context import PermanentError, RetryableError
from tasks.sandbox.confinement import egress_socket
from tasks.sandbox.egress import RELAY_SOURCE, EgressProxy
from tasks.sandbox.joblog import JobLog
from tasks.sandbox.runner import Bind, CommandTimedOut, Output, run_command
from tasks.sandbox.unpack import extract, write_files
from tasks.sandbox.workspace import Workspace

# What git prints when the repository or ref does not exist: another attempt would not help.
MISSING = re.compile(
    r"couldn't find remote ref|not our ref|repository '.*' not found|does not appear to be a git repository"
    r"|Could not read from remote repository|unable to find|invalid refspec|not a valid object name",
    re.IGNORECASE,
)
INNER_SOCKET = Path("/run/conveyor-egress.sock")  # where the sandbox sees the proxy's socket


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


def fetch(
    source: dict, workspace: Workspace, log: JobLog, open_upload: Callable[[str], AbstractContextManager[IO[bytes]]]
) -> None:
    """The job's source into the work directory: its files, its upload (opened by `open_upload`, the
    context's, which checks the owner) or a clone of its git repository."""
    try:
        if "files" in source:
            write_files(source["files"], workspace.src)
        elif "upload" in source:
            with open_upload(source["upload"]) as f:
                extract(f, workspace.src)
        else:
            clone(source["git"]["url"], source["git"]["ref"], workspace, log)
    except ArchiveError as exc:
        raise PermanentError(f"source refused: {exc}") from exc
    workspace.hand_over()


def file_repository(url: str) -> str:
    """The real path of a file:// repository, if it lies in one of JOB_GIT_FILE_ROOTS; PermanentError
    otherwise (what the URL names is mounted into the sandbox: it must not be /, /proc or /root)."""
    path = os.path.realpath(urlsplit(url).path)
    for root in settings.JOB_GIT_FILE_ROOTS:
        real_root = os.path.realpath(root)
        if real_root != "/" and os.path.commonpath([path, real_root]) == real_root and path != real_root:
            return path
    roots = ", ".join(settings.JOB_GIT_FILE_ROOTS) or "none configured"
    raise PermanentError(f"git: {url}: file:// repositories must lie in JOB_GIT_FILE_ROOTS ({roots})")


def clone(url: str, ref: str, workspace: Workspace, log: JobLog) -> None:
    """A shallow fetch of one ref (branch, tag or commit) and a checkout of it, in the sandbox."""
    parts = urlsplit(url)
    if parts.scheme not in settings.JOB_GIT_SCHEMES:  # the setting may have changed since submission
        raise PermanentError(f"git: {url}: the URL scheme must be one of {', '.join(settings.JOB_GIT_SCHEMES)}")
    env = {
        "GIT_TERMINAL_PROMPT": "0",  # never wait for a password
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": parts.scheme,  # no other transport, whatever the repository says
    }
    options = ["-c", "advice.detachedHead=false", "-c", "init.defaultBranch=main"]
    binds: list[Bind] = []
    if parts.scheme == "file":
        # A repository on the worker's disk (opt-in), read-only, owned by someone else than the job:
        # git reads `safe.directory` from its global configuration only, not from `-c`.
        repository = file_repository(url)
        binds.append(repository)
        url = f"file://{repository}"
        config = workspace.root / "gitconfig"
        config.write_text("[safe]\n\tdirectory = *\n")
        config.chmod(0o644)
        env["GIT_CONFIG_GLOBAL"] = workspace.inner(config)
    else:
        binds += [path for path in ("/etc/ssl", settings.JOB_GIT_CA_FILE) if path and Path(path).exists()]
        if settings.JOB_GIT_CA_FILE:
            options += ["-c", f"http.sslCAInfo={settings.JOB_GIT_CA_FILE}"]
    fetch = ["git", *options, "fetch", "--depth", "1", "--no-tags", "--", url, ref]
    deadline = time.monotonic() + settings.JOB_GIT_TIMEOUT_SECONDS
    _git(["git", *options, "init", "-q", "."], workspace, log, env, binds, deadline)
    if parts.scheme == "file":
        _git(fetch, workspace, log, env, binds, deadline, url=url, ref=ref)
    else:
        socket_path = egress_socket(workspace.slot.number if workspace.slot else None)
        inner = socket_path if workspace.sandbox != "bwrap" else INNER_SOCKET
        proxy = EgressProxy(
            str(socket_path),
            allowed_hosts=settings.JOB_GIT_ALLOWED_HOSTS,
            max_bytes=settings.JOB_GIT_MAX_BYTES,
            deadline=deadline,
            ports=frozenset(settings.JOB_GIT_PORTS),
        )
        relay = ["python", "-I", "-c", RELAY_SOURCE, str(inner), "--"]
        with proxy:
            binds_with_socket = [*binds, (str(socket_path), str(INNER_SOCKET))]
            _git(fetch, workspace, log, env, binds_with_socket, deadline, url=url, ref=ref, relay=relay, proxy=proxy)
    _git(["git", *options, "checkout", "-q", "FETCH_HEAD"], workspace, log, env, binds, deadline)


def _git(
    argv: list[str],
    workspace: Workspace,
    log: JobLog,
    env: dict[str, str],
    binds: list[Bind],
    deadline: float,
    *,
    url: str = "",
    ref: str = "",
    relay: list[str] | None = None,
    proxy: EgressProxy | None = None,
) -> None:
    log.line(f"$ {' '.join(argv)}")
    captured = Captured(log)
    try:
        code = run_command(
            [*(relay or []), *argv],
            workspace,
            captured,
            env=env,
            timeout=max(1.0, deadline - time.monotonic()),
            ro_binds=binds,
        )
    except CommandTimedOut:
        code = None
    if code == 0:
        return
    if code is None or (proxy is not None and proxy.expired):
        raise RetryableError(
            f"git: fetching {ref!r} from {url} took longer than {settings.JOB_GIT_TIMEOUT_SECONDS}s "
            "(JOB_GIT_TIMEOUT_SECONDS)"
        )
    if proxy is not None:
        if proxy.exceeded:
            raise PermanentError(
                f"git: {url} sent more than {settings.JOB_GIT_MAX_BYTES} bytes (JOB_GIT_MAX_BYTES); not fetched"
            )
        if proxy.refusals:
            raise PermanentError(f"git: cannot fetch {ref!r} from {url}: {proxy.refusals[0]}")
        if proxy.failures:
            raise RetryableError(f"git: fetching {ref!r} from {url} failed: {proxy.failures[0]}")
    lines = [line.strip() for line in captured.text.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
    detail = detail or f"exit code {code}"
    if not url:
        raise PermanentError(f"git: `{shlex.join(argv)}` failed: {detail}")
    if MISSING.search(captured.text):
        raise PermanentError(f"git: cannot fetch {ref!r} from {url}: {detail}")
    raise RetryableError(f"git: fetching {ref!r} from {url} failed: {detail}")
