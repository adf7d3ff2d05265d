"""The `build` kind: `python -m build` (sdist and wheel) by default; matching files become artifacts."""

from typing import Any

from tasks.context import Context
from tasks.kinds.tool import tool_run

# No isolation: the sandbox has no network to install a build backend into a fresh environment, so
# the toolchain's own setuptools (and wheel) build it.
DEFAULT_COMMAND = ["python", "-m", "build", "--no-isolation"]
DEFAULT_ARTIFACTS = ["dist/*"]


def handle(ctx: Context) -> dict[str, Any]:
    job = ctx.job
    with tool_run(ctx) as run:
        code = run.run(run.command or DEFAULT_COMMAND)
        found = run.collect_artifacts(job.payload.get("artifacts") or DEFAULT_ARTIFACTS)
        for artifact in found:
            run.log.line(
                f"[conveyor] artifact {artifact['name']} ({artifact['size']} bytes, sha256 {artifact['sha256']})"
            )
        return {"outcome": "passed" if code == 0 else "failed", "exit_code": code, "artifacts": found}
