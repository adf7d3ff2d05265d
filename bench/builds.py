"""The platform's overhead on a test job (`make bench`): pytest run directly on the sample project
against the same tree submitted as a `test` job (submit -> succeeded), median of BENCH_RUNS; and how
soon after the job starts its first log line reaches a live subscriber.

Uses the database and Redis of bench/throughput.py (BENCH_DATABASE_URL, BENCH_REDIS_URL).
"""

# ruff: noqa: I001 (bench.throughput must be imported first: it configures Django)
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import prepare, reset, start_worker, stop_worker  # first: it sets Django up

from rest_framework.test import APIClient

from apps.jobs import live
from apps.jobs.models import Job
from tasks.sandbox.confinement import capabilities
from tests.tooljobs import SAMPLE, TOOLCHAIN_PYTHON, sample_files

RUNS = int(os.environ.get("BENCH_RUNS", "10"))


def direct() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(SAMPLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
        start = time.perf_counter()
        subprocess.run(
            [TOOLCHAIN_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tree, capture_output=True
        )
        return time.perf_counter() - start


class FirstLines:
    """Listens on the job's live channel and notes when the first log line and the tool's first
    line (not the platform's own `[conveyor]` / `$ command` lines) arrive."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.first: float | None = None
        self.tool: float | None = None
        # Every job's channel, subscribed before the job exists, so that no early line is missed.
        self._pubsub = live.client().pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(live.channel("*"))
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while self.tool is None:
            message = self._pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            event = json.loads(message["data"])
            if event.get("type") != "log" or message["channel"].decode() != live.channel(self.job_id):
                continue
            now = time.time()
            self.first = self.first or now
            own = all(line.startswith(("[conveyor]", "$ ")) for line in event["text"].splitlines() if line)
            if not own:
                self.tool = now

    def close(self) -> None:
        self._thread.join(5)
        self._pubsub.close()


def through_conveyor(api: APIClient, files: dict[str, str]) -> tuple[float, float, float]:
    lines = FirstLines()
    start = time.perf_counter()
    response = api.post("/api/jobs/", {"kind": "test", "payload": {"source": {"files": files}}}, format="json")
    job_id = lines.job_id = response.json()["id"]
    while not Job.objects.filter(pk=job_id, status=Job.Status.SUCCEEDED).exists():
        if Job.objects.filter(pk=job_id, status__in=[Job.Status.FAILED, Job.Status.TIMED_OUT]).exists():
            raise SystemExit(f"job {job_id} failed: {Job.objects.get(pk=job_id).error}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    lines.close()
    started = Job.objects.get(pk=job_id).started_at.timestamp()
    first = (lines.first - started) * 1000 if lines.first else float("nan")
    tool = (lines.tool - started) * 1000 if lines.tool else float("nan")
    return elapsed, first, tool


def main() -> None:
    _, api = prepare()
    files = sample_files()
    worker = start_worker()
    try:
        direct()  # warm the file cache
        through_conveyor(api, files)
        direct_times = [direct() for _ in range(RUNS)]
        runs = [through_conveyor(api, files) for _ in range(RUNS)]
    finally:
        stop_worker(worker)
        reset()
    d = statistics.median(direct_times) * 1000
    c = statistics.median(r[0] for r in runs) * 1000
    print(f"\ntest job on the sample project, median of {RUNS}, sandbox {capabilities().describe()}")
    print(f"{'pytest directly':<34} {d:8.1f} ms")
    print(f"{'through Conveyor (submit->done)':<34} {c:8.1f} ms   ratio {c / d:5.2f}")
    print(f"{'overhead per job':<34} {c - d:8.1f} ms   (target < 300 ms)")
    print(f"{'first log line after start':<34} {statistics.median(r[1] for r in runs):8.1f} ms   (target < 100 ms)")
    print(f"{'first line of pytest after start':<34} {statistics.median(r[2] for r in runs):8.1f} ms")


if __name__ == "__main__":
    main()
