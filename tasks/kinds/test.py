"""The `test` kind: pytest (by default `python -m pytest`) with its JUnit XML read into counts.

(pytest collects `test_*.py` under `tests/` only, so this module is not taken for a test module.)
"""

import io
import math
from typing import Any

import defusedxml.ElementTree as ET
from defusedxml.common import DefusedXmlException

from tasks.context import Context
from tasks.kinds.tool import tool_run

DEFAULT_COMMAND = ["python", "-m", "pytest"]
MAX_FAILURES = 50
MAX_REPORT_BYTES = 20 * 1024 * 1024
MAX_REPORT_DEPTH = 16  # testsuites > testsuite > testcase > failure: a report is never deeper


def handle(ctx: Context) -> dict[str, Any]:
    job = ctx.job
    with tool_run(ctx) as run:
        junit = run.workspace.out / "junit.xml"
        # Through PYTEST_ADDOPTS every pytest the command starts writes the report, `make test` too.
        # xunit1 records each test's file, from which its pytest node id is rebuilt.
        addopts = f"--junitxml={run.workspace.inner(junit)} -o junit_family=xunit1 -p no:cacheprovider"
        user = job.payload.get("env", {}).get("PYTEST_ADDOPTS", "")
        code = run.run(run.command or DEFAULT_COMMAND, env={"PYTEST_ADDOPTS": f"{user} {addopts}".strip()})
        report = run.read_report("out/junit.xml", MAX_REPORT_BYTES)
        result = {"outcome": "passed" if code == 0 else "failed", "exit_code": code, **read_junit(report)}
        if job.payload.get("artifacts"):
            result["artifacts"] = run.collect_artifacts(job.payload["artifacts"])
        run.log.line(summary(result))
        return result


def read_junit(report: bytes | None) -> dict[str, Any]:
    """Counts as pytest reports them, from its JUnit XML; None for each when there is no report.

    The report is the job's to write: it is parsed as a stream (each test case dropped once counted),
    and a document nested deeper than a JUnit report ever is counts as no report.
    """
    empty = {**dict.fromkeys(("tests", "passed", "failed", "errors", "skipped", "duration_s")), "failures": []}
    if report is None:
        return empty
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    duration = 0.0
    passed = 0
    failures: list[dict[str, str]] = []
    depth, root = 0, ""
    try:
        for event, element in ET.iterparse(io.BytesIO(report), events=("start", "end")):
            if event == "start":
                depth += 1
                root = root or element.tag
                if depth > MAX_REPORT_DEPTH:
                    return empty
                continue
            if element.tag == "testsuite" and (depth == 1 or (depth == 2 and root == "testsuites")):
                for name in counts:
                    counts[name] += _count(element.get(name))
                duration += _seconds(element.get("time"))
                element.clear()
            elif element.tag == "testcase":
                problems = [child for child in element if child.tag in ("failure", "error")]
                if not problems and element.find("skipped") is None:
                    passed += 1
                for problem in problems:
                    if len(failures) < MAX_FAILURES:
                        failures.append({"test": node_id(element), "message": (problem.get("message") or "")[:2000]})
                element.clear()  # keep nothing of what was counted
            depth -= 1
    except (ET.ParseError, DefusedXmlException):
        return empty
    return {
        "tests": counts["tests"],
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "duration_s": round(duration, 3),
        "failures": failures,
    }


def _count(value: str | None) -> int:
    """A count attribute of the report (which the job could have written itself): 0 unless a number."""
    return int(value) if value and value.isdigit() and len(value) < 10 else 0


def _seconds(value: str | None) -> float:
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and 0 <= seconds < 1e9 else 0.0


def node_id(case: Any) -> str:
    """`tests/test_x.py::TestY::test_z` from xunit1's file, classname and name."""
    name, classname, file = case.get("name", ""), case.get("classname", ""), case.get("file")
    if not file:
        return f"{classname}::{name}" if classname else name
    module = file.removesuffix(".py").replace("/", ".")
    inner = classname[len(module) + 1 :].split(".") if classname.startswith(module + ".") else []
    return "::".join([file, *inner, name])


def summary(result: dict[str, Any]) -> str:
    if result["tests"] is None:
        return f"[conveyor] no JUnit report; outcome {result['outcome']}"
    return (
        f"[conveyor] {result['tests']} tests: {result['passed']} passed, {result['failed']} failed, "
        f"{result['errors']} errors, {result['skipped']} skipped"
    )
