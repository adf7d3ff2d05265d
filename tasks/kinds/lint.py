"""The `lint` kind: ruff (by default `ruff check --output-format json`), its findings as diagnostics."""

import json
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

from tasks.context import Context, PermanentError
from tasks.kinds.tool import tool_run

DEFAULT_COMMAND = ["ruff", "check", "--output-format", "json"]
MAX_DIAGNOSTICS = 1000
MAX_REPORT_BYTES = 5 * 1024 * 1024  # ~15,000 diagnostics; parsed whole, so kept small
MAX_CODES = 200  # the most frequent rule codes in `by_code` (a report is the job's to write)


def handle(ctx: Context) -> dict[str, Any]:
    job = ctx.job
    with tool_run(ctx) as run:
        findings = run.workspace.out / "ruff.json"
        # Through the environment, any ruff the command starts writes JSON to the report file.
        code = run.run(
            run.command or DEFAULT_COMMAND,
            env={
                "RUFF_OUTPUT_FORMAT": "json",
                "RUFF_OUTPUT_FILE": run.workspace.inner(findings),
                "RUFF_NO_CACHE": "true",
            },
        )
        report = run.read_report("out/ruff.json", MAX_REPORT_BYTES)
        try:
            raw = json.loads(report) if report is not None else None
        except ValueError:
            raw = None
        if not isinstance(raw, list):
            raise PermanentError(f"the lint command exited with {code} without a ruff report; see the log")
        src = run.workspace.inner(run.workspace.src)
        diagnostics = [diagnostic(item, src) for item in raw if isinstance(item, dict)]
        if diagnostics:  # one write for all (the log keeps its first JOB_LOG_MAX_BYTES)
            run.log.line(
                "\n".join(f"{d['path']}:{d['line']}:{d['column']}: {d['code']} {d['message']}" for d in diagnostics)
            )
        run.log.line(f"[conveyor] {len(diagnostics)} diagnostics")
        result = {
            "outcome": "clean" if not diagnostics else "issues",
            "exit_code": code,
            "count": len(diagnostics),
            "diagnostics": diagnostics[:MAX_DIAGNOSTICS],
            "by_code": dict(Counter(d["code"] for d in diagnostics).most_common(MAX_CODES)),
        }
        if job.payload.get("artifacts"):
            result["artifacts"] = run.collect_artifacts(job.payload["artifacts"])
        return result


def diagnostic(item: dict, src: str) -> dict[str, Any]:
    """One ruff finding, its path relative to the tree (`src` as the command saw it). The report is
    the job's to write, so every field is checked for its type and cut to a sane length."""
    path = _text(item.get("filename"), 1000)
    if PurePosixPath(path).is_relative_to(src):
        path = PurePosixPath(path).relative_to(src).as_posix()
    location = item.get("location") if isinstance(item.get("location"), dict) else {}
    return {
        "path": path,
        "line": _position(location.get("row")),
        "column": _position(location.get("column")),
        "code": _text(item.get("code"), 50) or "syntax-error",
        "message": _text(item.get("message"), 2000),
    }


def _text(value: object, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _position(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31 else None
