"""Event streams at scale (`make bench`): BENCH_STREAMS (1,000) Server-Sent Events streams open on ONE
web process (gunicorn + uvicorn, as the Procfile starts it), while API reads (`GET /api/jobs/`, the
first page) keep going; p50/p95/p99 of the reads against the same reads with no stream open (the
reference), and how long a status change takes to reach every open stream.

Uses the database and Redis of bench/throughput.py (BENCH_DATABASE_URL, BENCH_REDIS_URL).
"""

# ruff: noqa: I001 (bench.throughput must be imported first: it configures Django)
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import ROOT, prepare, reset  # first: it sets Django up

from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from apps.jobs import lifecycle, live
from apps.jobs.services import build_job
from tests.conftest import _free_port

STREAMS = int(os.environ.get("BENCH_STREAMS", "1000"))
READS = int(os.environ.get("BENCH_STREAM_READS", "300"))
EVENTS = int(os.environ.get("BENCH_STREAM_EVENTS", "500"))  # progress events per second while reads are timed


def start_web(port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "JOBS_MAX_STREAMS_PER_USER": str(STREAMS * 2),
        "JOBS_READ_RATE": "10000000/min",
        "ALLOWED_HOSTS": "127.0.0.1",
        "DB_POOL_SIZE": "8",
    }  # fmt: skip (as the Procfile runs web)
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.asgi:application", "-k", "project.asgi.Worker", "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning"],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=5)
            return web
        except urllib.error.HTTPError:
            return web  # 401: it answers
        except OSError as exc:
            if time.monotonic() > deadline:
                web.kill()
                raise SystemExit(f"web did not start: {exc}") from None
            time.sleep(0.2)


async def read_times(port: int, token: str, count: int) -> list[float]:
    """Sequential `GET /api/jobs/` on one keep-alive connection, each timed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /api/jobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n".encode()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        assert status == 200, status
        times.append(time.perf_counter() - started)
    writer.close()
    return times


async def open_stream(port: int, token: str, job_id: object) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream opened, and its first `status` read. The writer is kept: dropping it closes the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /api/jobs/{job_id}/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n".encode()
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"a stream was refused: {status!r} {await reader.read(300)!r}")
    await next_event(reader)  # the first `status`
    return reader, writer


async def next_event(reader: asyncio.StreamReader) -> str:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if line.startswith(b"event: "):
            return line[7:].strip().decode()
        if not line:
            raise SystemExit("a stream ended early")


def percentiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return pick(0.5), pick(0.95), pick(0.99)


def publish_progress(job_ids: list, per_second: int, stop: threading.Event) -> int:
    """Progress events for random open streams while the loaded reads run: streams at work, not idle."""
    client = live.client()
    sent = 0
    while not stop.is_set():
        started = time.perf_counter()
        with client.pipeline(transaction=False) as pipe:
            for _ in range(per_second // 10):
                event = {"type": "progress", "progress": random.randint(0, 99), "message": "working"}
                pipe.publish(live.channel(random.choice(job_ids)), json.dumps(event))
                sent += 1
            pipe.execute()
        stop.wait(max(0.0, 0.1 - (time.perf_counter() - started)))
    return sent


async def scenario(port: int, token: str, jobs: list) -> dict:
    try:
        return await _scenario(port, token, jobs)
    except BaseException:
        traceback.print_exc()  # asyncio.run() may hang closing its executor: say what went wrong first
        raise


async def _scenario(port: int, token: str, jobs: list) -> dict:
    reference = await read_times(port, token, READS)
    started = time.perf_counter()
    streams = []
    for batch in range(0, len(jobs), 100):  # opened 100 at a time, as clients arrive
        streams += await asyncio.gather(*(open_stream(port, token, job.pk) for job in jobs[batch : batch + 100]))
    opened = time.perf_counter() - started
    idle = await read_times(port, token, READS)
    stop = threading.Event()
    publisher = asyncio.create_task(asyncio.to_thread(publish_progress, [job.pk for job in jobs], EVENTS, stop))
    delivered = [0]
    drains = [asyncio.create_task(drain(reader, delivered)) for reader, _ in streams]
    try:
        loaded = await read_times(port, token, READS)
    finally:
        stop.set()
    sent = await publisher
    await asyncio.sleep(1)
    received = delivered[0]
    for task in drains:
        task.cancel()
    # Then each job's status changes: from its commit to its stream's `status` (or `end`) event.
    cancelled_at: dict[str, float] = {}

    def cancel_all() -> None:
        for job in jobs:
            lifecycle.cancel(job.pk)
            cancelled_at[str(job.pk)] = time.perf_counter()

    arrivals = await asyncio.gather(asyncio.to_thread(cancel_all), *(wait_status(reader) for reader, _ in streams))
    latencies = [arrived - cancelled_at[str(job.pk)] for job, arrived in zip(jobs, arrivals[1:], strict=True)]
    for _, writer in streams:
        writer.close()
    return {"reference": reference, "idle": idle, "loaded": loaded, "opened": opened, "fanout": latencies,
            "sent": sent, "received": received}  # fmt: skip


async def drain(reader: asyncio.StreamReader, delivered: list[int]) -> None:
    """Counts the progress events a stream receives while the reads run."""
    while True:
        line = await reader.readline()
        if line.startswith(b"event: progress"):
            delivered[0] += 1


async def wait_status(reader: asyncio.StreamReader) -> float:
    while await next_event(reader) not in ("status", "end"):  # `end` alone: the row said so first
        pass
    return time.perf_counter()


def main() -> None:
    prepare()
    reset()
    user, _ = User.objects.get_or_create(username="bench-streams")
    token = Token.objects.get_or_create(user=user)[0].key
    jobs = lifecycle.create_jobs(
        [build_job(user, {"kind": "echo", "payload": {"message": "m"}}) for _ in range(STREAMS)]
    )
    port = _free_port()
    web = start_web(port)
    try:
        result = asyncio.run(scenario(port, token, jobs))
    finally:
        web.terminate()
        web.wait(30)
    ref, idle, loaded = (percentiles(result[phase]) for phase in ("reference", "idle", "loaded"))
    print(f"\n{STREAMS} event streams on one web process (gunicorn + uvicorn), {READS} reads of GET /api/jobs/ each")
    print(f"streams opened in {result['opened']:.1f} s")
    for name, figures in (("no stream open", ref), (f"{STREAMS} streams open", idle),
                          (f"{STREAMS} streams, {EVENTS} events/s", loaded)):  # fmt: skip
        print(f"reads, {name:<28} p50 {figures[0]:6.1f} ms  p95 {figures[1]:6.1f} ms  p99 {figures[2]:6.1f} ms"
              f"  (ratio {figures[2] / ref[2]:.2f})")  # fmt: skip
    print("target: reads p99 < 100 ms with the streams open")
    print(f"events: {result['sent']} progress events published, {result['received']} delivered")
    fanout = percentiles(result["fanout"])
    print(f"a job's status change to its stream: p50 {fanout[0]:.1f} ms, p95 {fanout[1]:.1f} ms, "
          f"p99 {fanout[2]:.1f} ms")  # fmt: skip
    print(
        json.dumps(
            {"p99_ms": round(idle[2], 1), "events_p99_ms": round(loaded[2], 1), "reference_p99_ms": round(ref[2], 1)}
        )
    )


if __name__ == "__main__":
    main()
