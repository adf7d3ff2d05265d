"""ai_generate throughput against direct SDK calls (`make bench`), on the local OpenAI-compatible
server of the tests answering in BENCH_AI_DELAY_MS (50 ms): jobs through Conveyor on a worker of
each setup of BENCH_AI_SETUPS (prefork with 8 processes and BENCH_AI_N (500) jobs, then threads with
64 and four times as many), against as many `openai` SDK calls from that many threads; and the time
from the provider sending the first token to a client seeing it on SSE.

Uses the database and Redis of bench/throughput.py (BENCH_DATABASE_URL, BENCH_REDIS_URL).
"""

# ruff: noqa: I001 (bench.throughput must be imported first: it configures Django)
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import CPU, R, ROOT, prepare, reset, stop_worker, wait  # first: it sets Django up

import openai
from celery import current_app
from rest_framework.test import APIClient

from apps.jobs.models import Job
from bench.raw import sdk_call
from tests.fake_llm import FakeLLM

N = int(os.environ.get("BENCH_AI_N", "500"))
# Each setup: pool, concurrency (as many direct SDK threads), jobs. BENCH_AI_SETUPS="prefork:8:500,threads:64:2000"
SETUPS = [
    (pool, int(concurrency), int(jobs))
    for pool, concurrency, jobs in (
        item.split(":") for item in os.environ.get("BENCH_AI_SETUPS", f"prefork:8:{N},threads:64:{4 * N}").split(",")
    )
]
DELAY = int(os.environ.get("BENCH_AI_DELAY_MS", "50")) / 1000
KEY = "sk-bench-0123456789abcdef"
EXTRA = os.environ.get("BENCH_AI_WORKER_ARGS", "").split()


def start_provider() -> tuple[subprocess.Popen, str]:
    """The fake provider in a process of its own, as a real one would be (not sharing our GIL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", str(DELAY)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    return proc, proc.stdout.readline().strip()


def start_worker(url: str, pool: str = "prefork", concurrency: int = 8) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": KEY, "AI_DEFAULT_PROVIDER": "openai"}
    if pool == "threads":  # as the README says to run a threads worker (0: a connection per thread)
        env["DB_POOL_SIZE"] = os.environ.get("BENCH_AI_THREADS_DB_POOL", "8")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-P", pool, "-c", str(concurrency),
         "-l", "WARNING", "-Q", "ai", "--include", "bench.raw", "--without-gossip", "--without-mingle", *EXTRA],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(current_app.control.ping(timeout=0.5)) < 1:
        if time.monotonic() > deadline:
            raise SystemExit("worker did not start")
    return worker


def direct(url: str, concurrency: int, n: int) -> float:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

    def call(i: int) -> str:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"direct {i}"}], stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        texts = list(pool.map(call, range(n)))
    assert all(texts)
    return n / (time.perf_counter() - start)


def plain_celery(url: str, n: int) -> float:
    """The same calls as plain Celery tasks on the same worker (`bench.sdk_call`): what any path
    through Celery can reach, before Conveyor does anything."""
    R.set("bench:done", 0)
    start = time.perf_counter()
    for i in range(n):
        sdk_call.apply_async(args=[f"{url}/v1", KEY, f"plain {i}"], queue="ai", priority=6)
    wait(lambda: int(R.get("bench:done") or 0) >= n, what="plain tasks to drain")
    return n / (time.perf_counter() - start)


def through_conveyor(api: APIClient, n: int) -> float:
    jobs = [{"kind": "ai_generate", "payload": {"prompt": f"job {i}", "dedupe": False}} for i in range(n)]
    start = time.perf_counter()
    # In batches of 50, as a client feeding a queue would: the first jobs run while the rest arrive.
    for i in range(0, n, 50):
        assert api.post("/api/jobs/batch/", {"jobs": jobs[i : i + 50]}, format="json").status_code == 201
    wait(lambda: Job.objects.filter(kind="ai_generate", status=Job.Status.SUCCEEDED).count() >= n, interval=0.02)
    rate = n / (time.perf_counter() - start)
    failed = Job.objects.filter(kind="ai_generate").exclude(status=Job.Status.SUCCEEDED).count()
    assert not failed, f"{failed} jobs did not succeed"
    rows = Job.objects.filter(kind="ai_generate").values_list("started_at", "finished_at")
    run = statistics.median((f - s).total_seconds() * 1000 for s, f in rows)
    print(f"conveyor: median time in the handler and transitions (started -> finished) {run:.1f} ms")
    return rate


async def first_text(events: AsyncIterator[bytes]) -> float | None:
    """When the first `text` event came out of an (ASGI) event stream, read to its end."""
    seen = None
    async for chunk in events:
        if seen is None and b"event: text" in chunk:
            seen = time.time()
    return seen


def first_token_on_sse(api: APIClient, llm: FakeLLM, samples: int = 10) -> float:
    """Milliseconds from the server writing the first token to the SSE client reading it."""
    llm.reset(tokens=["a", "b", "c", "d"], token_delay=0.05)
    latencies = []
    for i in range(samples):
        job_id = api.post("/api/ai/generate/", {"prompt": f"sse {i}", "dedupe": False}, format="json").json()["id"]
        response = api.get(f"/api/jobs/{job_id}/stream/")
        seen = asyncio.run(first_text(response.streaming_content))
        request = next(r for r in llm.requests if r.body["messages"][0]["content"] == f"sse {i}")
        latencies.append((seen - request.first_token_at) * 1000)
    return statistics.median(latencies)


def main() -> None:
    _, api = prepare()
    provider, url = start_provider()
    figures = []
    try:
        for pool, concurrency, n in SETUPS:
            worker = start_worker(url, pool, concurrency)
            try:
                with CPU(worker, provider=provider) as direct_cpu:
                    direct_rate = direct(url, concurrency, n)
                with CPU(worker, provider=provider) as plain_cpu:
                    plain_rate = plain_celery(url, n)
                with CPU(worker, provider=provider) as conveyor_cpu:
                    conveyor_rate = through_conveyor(api, n)
            finally:
                stop_worker(worker)
                reset()
            rates, cpus = (direct_rate, plain_rate, conveyor_rate), (direct_cpu, plain_cpu, conveyor_cpu)
            figures.append((pool, concurrency, n, *rates, *cpus))
    finally:
        provider.terminate()
    # The first-token figure needs the provider's own clock: one in this process, and a worker on it.
    llm = FakeLLM().start()
    worker = start_worker(llm.url)
    try:
        ttft = first_token_on_sse(api, llm)
    finally:
        stop_worker(worker)
        llm.stop()
        reset()
    print(f"\nai_generate jobs, provider answering in {DELAY * 1000:.0f} ms")
    for pool, concurrency, n, direct_rate, plain_rate, conveyor_rate, direct_cpu, plain_cpu, conveyor_cpu in figures:
        print(f"{n} jobs, worker -P {pool} -c {concurrency}, against {concurrency} threads calling the SDK")
        print(f"  {'direct SDK calls':<32} {direct_rate:8.1f} /s")
        print(f"  {'plain Celery task, same call':<32} {plain_rate:8.1f} /s   ratio {plain_rate / direct_rate:5.2f}")
        print(f"  {'through Conveyor (submit->done)':<32} {conveyor_rate:8.1f} /s   "
              f"ratio {conveyor_rate / direct_rate:5.2f}  (target >= 0.9)")  # fmt: skip
        print(f"    CPU ms per job, direct:   {direct_cpu.per_job(n)}")
        print(f"    CPU ms per job, plain:    {plain_cpu.per_job(n)}")
        print(f"    CPU ms per job, conveyor: {conveyor_cpu.per_job(n)}")
    print(f"{'first token, provider -> SSE':<34} {ttft:8.1f} ms  (target < 100 ms)")


if __name__ == "__main__":
    main()
