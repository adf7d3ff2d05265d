"""`message` jobs against their providers' limits (`make bench`), on the tests' local Twilio and Discord
servers, each in a process of its own (`python bench/messages.py --serve twilio|discord`), and TWO
workers on the `messages` queue (BENCH_MSG_POOL, default threads with 16 threads and DB_POOL_SIZE=8):

1. SMS: BENCH_MSG_SMS_N (1,000) jobs, each to a number of its own with a text of its own, under one
   sender limit SMS_RATE_PER_SECOND (200): the rate the fake accepted them at (first to last
   acceptance), the most it accepted in any sliding second, submit -> accepted p50/p95. References in
   the same run: the twilio SDK sending the same messages directly from BENCH_MSG_DIRECT_THREADS (32)
   threads with a simple limiter at the same rate, and unlimited (the fake's own capacity); and the
   same two workers running a plain Celery task (`bench.sms_plain`: the same Redis limiter, the same
   SDK call, no job row). Then BENCH_MSG_PACED_N (200) jobs submitted one by one at half the limit:
   the latency of a send that does not queue behind the limit.
2. Discord: BENCH_MSG_DISCORD_N (500) jobs to 5 channels whose buckets allow 5 per 5 s: the 429s each
   bucket got (after the first, none more), and the rate against the ideal (5 channels x 1/s).

The local Twilio answers each request on a kept-alive connection in ~44 ms (see `serve`): it stands in
for a provider's latency. BENCH_MSG_TWILIO_NODELAY=1 makes it answer at once. For experiments:
BENCH_MSG_PHASES (direct,plain,conveyor,paced,discord), BENCH_MSG_SMS_RATE (a high one measures what
the workers can do with no limit), BENCH_MSG_WORKER_INCLUDE (modules the workers import too).

Uses the database and Redis of bench/throughput.py (BENCH_DATABASE_URL, BENCH_REDIS_URL).
"""

# ruff: noqa: E402, I001 (the fakes' runner comes before Django is set up; bench.throughput first: it configures Django)
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TWILIO_SID, TWILIO_TOKEN, TWILIO_FROM = "AC" + "1" * 32, "test-token", "+15550000001"
DISCORD_TOKEN = "bot-token"


def serve(kind: str, args: list[str]) -> None:
    """A fake provider in this process: prints its URL, then answers one line on stdin at a time:
    `reset`, `dump` (a JSON line of what it recorded), `quit`."""
    if kind == "twilio":
        from tests import fake_twilio
        from tests.fake_twilio import FakeTwilio

        # socketserver's listen backlog is 5: 32 clients connecting at once overflow it, and the kernel
        # resets some of them (a fake's limit, not Twilio's)
        fake_twilio._Server.request_queue_size = 128
        fake = FakeTwilio(TWILIO_SID, TWILIO_TOKEN)
        # It writes an answer's headers and body apart: with Nagle's algorithm on its socket and the
        # client's delayed ACK, each request on a kept-alive connection takes ~44 ms (a provider's
        # latency, to be covered by concurrency). "nodelay": answered at once.
        fake.server.RequestHandlerClass.disable_nagle_algorithm = args[:1] == ["nodelay"]
        fake.start()
    else:
        from tests.fake_discord import FakeDiscord

        limit, window = (int(args[0]), float(args[1])) if args else (None, 5.0)
        fake = FakeDiscord(bot_token=DISCORD_TOKEN, bucket_limit=limit, bucket_window=window).start()
    print(fake.url, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "reset":
            fake.reset()
            print("{}", flush=True)
        elif command == "dump":
            with fake.lock:
                if kind == "twilio":
                    record = {
                        "messages": [(m.to, m.body, m.at) for m in fake.messages],
                        "statuses": [r.status for r in fake.requests],
                    }
                else:
                    record = {
                        "messages": [(m.channel_id, m.content, m.at) for m in fake.messages],
                        "rate_limited": list(fake.rate_limited),
                        "statuses": [r.status for r in fake.requests],
                    }
            print(json.dumps(record), flush=True)
        elif command == "quit":
            break


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2], sys.argv[3:])
    raise SystemExit(0)

from bench.throughput import CPU, R, prepare, reset, used, wait  # first: it sets Django up

import psutil
from celery import current_app, shared_task
from django.conf import settings
from rest_framework.test import APIClient

from apps.jobs.models import Job

SMS_N = int(os.environ.get("BENCH_MSG_SMS_N", "1000"))
PACED_N = int(os.environ.get("BENCH_MSG_PACED_N", "200"))
DISCORD_N = int(os.environ.get("BENCH_MSG_DISCORD_N", "500"))
SMS_RATE = float(os.environ.get("BENCH_MSG_SMS_RATE", "200"))
POOL, CONCURRENCY = os.environ.get("BENCH_MSG_POOL", "threads:16").split(":")
DIRECT_THREADS = int(os.environ.get("BENCH_MSG_DIRECT_THREADS", "32"))
# Modules the workers import besides bench.messages (an experiment's patch): "module,module"
INCLUDE = ",".join(["bench.messages", *filter(None, os.environ.get("BENCH_MSG_WORKER_INCLUDE", "").split(","))])
# Which parts to run: BENCH_MSG_PHASES="conveyor" for a profile of the Conveyor SMS run alone.
PHASES = set(os.environ.get("BENCH_MSG_PHASES", "direct,plain,conveyor,paced,discord").split(","))
CHANNELS = [str(1_200_000_000_000_000_000 + i) for i in range(5)]
BUCKET_LIMIT, BUCKET_WINDOW = 5, 5.0
FINAL = (Job.Status.SUCCEEDED, Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.TIMED_OUT)


@shared_task(name="bench.sms_plain")
def sms_plain(to: str, text: str) -> None:
    """The ceiling of any Celery path for SMS: a plain task (in the benchmark's workers with `--include
    bench.messages`) that takes its place in the same Redis limits as a `message` job and makes the same
    SDK call through the same per-thread client. No job row, no claim, no ledger."""
    from tasks.channels import ratelimit, sms

    limits = [  # the two a `message` job takes (tasks.channels.deliver): our number's and the destination's
        ratelimit.Limit(f"sms:from:{settings.TWILIO_FROM_NUMBER}", settings.SMS_RATE_PER_SECOND, 1),
        ratelimit.Limit(f"sms:to:{to.lower()}", settings.MESSAGE_DESTINATION_RATE_PER_SECOND,
                        settings.MESSAGE_DESTINATION_BURST),
    ]  # fmt: skip
    try:
        assert not ratelimit.acquire(limits, max_wait=3600)
        sms._client().messages.create(to=to, from_=settings.TWILIO_FROM_NUMBER, body=text)
    except Exception:
        R.incr("bench:failed")
        raise
    finally:
        R.incr("bench:done")


class Fake:
    """A fake provider's process, and its records."""

    def __init__(self, kind: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, *map(str, args)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise SystemExit(f"the fake {kind} did not start")

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def reset(self) -> None:
        self._ask("reset")

    def dump(self) -> dict:
        return self._ask("dump")

    def stop(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start_workers(twilio: Fake, discord: Fake) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "TWILIO_ACCOUNT_SID": TWILIO_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_FROM_NUMBER": TWILIO_FROM,
        "TWILIO_API_BASE_URL": twilio.url,
        "SMS_RATE_PER_SECOND": str(SMS_RATE),
        "DISCORD_BOT_TOKEN": DISCORD_TOKEN,
        "DISCORD_API_BASE_URL": discord.url + "/api/v10",
    }
    if POOL == "threads":  # as the README says to run a threads worker
        env["DB_POOL_SIZE"] = os.environ.get("BENCH_MSG_THREADS_DB_POOL", "8")
    workers = []
    for i in (1, 2):
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", "-P", POOL, "-c", CONCURRENCY,
             "-n", f"bench-messages-{i}@%h", "-l", "WARNING", "-Q", "messages", "--include", INCLUDE,
             "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env, start_new_session=True,
        ))  # fmt: skip
    deadline = time.monotonic() + 60
    while len(current_app.control.ping(timeout=0.5)) < len(workers):
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not start")
    return workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    """Warm shutdown of both at once (bench.throughput.stop_worker waits for no worker to answer)."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            print("worker: no warm shutdown within 30 s, killed", file=sys.stderr)
            os.killpg(worker.pid, 9)
            worker.wait()
    while current_app.control.ping(timeout=0.5):
        time.sleep(0.2)


def script_calls() -> int:
    """Lua scripts Redis has run (EVALSHA: the rate limiter's, and nothing else here)."""
    stats = R.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


class WorkersCPU(CPU):
    """bench.throughput.CPU over both workers: "worker main" and "pool" summed over the two, and the
    limiter's script calls."""

    def __init__(self, workers: list[subprocess.Popen], **others: subprocess.Popen) -> None:
        super().__init__(workers[0], **others)
        self.workers = [psutil.Process(worker.pid) for worker in workers]

    def _sample(self) -> dict[str, float]:
        sample = super()._sample()
        sample["worker main"] = used(self.workers)
        sample["pool"] = used([child for worker in self.workers for child in worker.children(recursive=True)])
        machine = psutil.cpu_times()
        sample["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)  # every process, the kernel
        return sample

    def __enter__(self) -> "WorkersCPU":
        self.scripts = -script_calls()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.scripts += script_calls()

    def cores(self) -> str:
        """Cores each used over the phase, and what the rest of the machine used (other processes: a
        test run beside the benchmark shows here)."""
        wall, spent = self.spent["wall"], dict(self.spent)
        machine = spent.pop("machine")
        del spent["wall"]
        spent["rest of the machine (approx.)"] = machine - sum(spent.values())
        return (
            ", ".join(f"{name} {seconds / wall:.2f}" for name, seconds in spent.items()) + f" (of {psutil.cpu_count()})"
        )

    def per_job(self, n: int) -> str:
        return ", ".join(
            f"{name} {s / n * 1000:.2f}" for name, s in self.spent.items() if name not in ("wall", "machine")
        )


# --- figures ----------------------------------------------------------------------------------


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any sliding window [t, t + window)."""
    times, best, j = sorted(times), 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def rate(times: list[float]) -> float:
    """Messages per second from the first acceptance to the last ((n - 1) intervals)."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def ideal_latencies(submitted: list[float], per_second: float) -> list[float]:
    """What a perfect limiter at `per_second` would give the same submissions: each accepted at its
    submission or one interval after the previous one, whichever is later."""
    last, latencies = float("-inf"), []
    for at in sorted(submitted):
        last = max(at, last + 1 / per_second)
        latencies.append(last - at)
    return latencies


def sms_figures(name: str, accepted: list[tuple[str, str, float]], submitted: dict[str, float] | None = None) -> dict:
    times = [at for _, _, at in accepted]
    figures = {"name": name, "n": len(times), "rate": rate(times), "max_1s": max_in_window(times)}
    if submitted is not None:
        latencies = [at - submitted[text] for _, text, at in accepted if text in submitted]
        ideal = ideal_latencies(list(submitted.values()), SMS_RATE)
        figures |= {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                    "ideal_p50": percentile(ideal, 50), "ideal_p95": percentile(ideal, 95)}  # fmt: skip
    return figures


# --- SMS ----------------------------------------------------------------------------------------


def numbers(n: int) -> list[str]:
    return [f"+1555{2_000_000 + i:07d}" for i in range(n)]


def direct_sms(twilio: Fake, tag: str, per_second: float | None) -> dict:
    """The twilio SDK from DIRECT_THREADS threads of this process (a client per thread, the app's own
    HTTP client class), behind a lock-step limiter at `per_second` (None: none)."""
    from twilio.rest import Client

    from tasks.channels.sms import _HttpClient

    local, lock, next_slot = threading.local(), threading.Lock(), [0.0]

    def send(i_to: tuple[int, str]) -> None:
        i, to = i_to
        if not hasattr(local, "client"):
            local.client = Client(TWILIO_SID, TWILIO_TOKEN, http_client=_HttpClient(twilio.url, 15), environment={})
        if per_second:
            with lock:
                now = time.monotonic()
                slot = next_slot[0] = max(now, next_slot[0] + 1 / per_second)
            time.sleep(max(0.0, slot - time.monotonic()))
        local.client.messages.create(to=to, from_=TWILIO_FROM, body=f"{tag} {i}")

    twilio.reset()
    with ThreadPoolExecutor(DIRECT_THREADS) as pool:
        list(pool.map(send, enumerate(numbers(SMS_N))))
    record = twilio.dump()
    assert len(record["messages"]) == SMS_N, f"{tag}: the fake accepted {len(record['messages'])} of {SMS_N}"
    return sms_figures(tag, record["messages"])


def conveyor_sms(api: APIClient, twilio: Fake, tag: str) -> dict:
    """SMS_N message jobs through the API in batches of 50, as fast as they go (the whole run queues
    behind the sender limit)."""
    twilio.reset()
    jobs = [{"kind": "message", "payload": {"channel": "sms", "to": to, "text": f"{tag} {i}"}}
            for i, to in enumerate(numbers(SMS_N))]  # fmt: skip
    submitted: dict[str, float] = {}
    for i in range(0, SMS_N, 50):
        at = time.time()
        assert api.post("/api/jobs/batch/", {"jobs": jobs[i : i + 50]}, format="json").status_code == 201
        submitted |= {job["payload"]["text"]: at for job in jobs[i : i + 50]}
    return _finish_sms(twilio, tag, submitted)


def paced_sms(api: APIClient, twilio: Fake, tag: str, per_second: float) -> dict:
    """PACED_N message jobs, one POST each at `per_second`: the latency of a send that finds the limit
    free."""
    twilio.reset()
    submitted: dict[str, float] = {}
    start = time.monotonic()
    for i, to in enumerate(numbers(PACED_N)):
        time.sleep(max(0.0, start + i / per_second - time.monotonic()))
        text = f"{tag} {i}"
        submitted[text] = time.time()
        response = api.post("/api/jobs/", {"kind": "message", "payload": {"channel": "sms", "to": to, "text": text}},
                            format="json")  # fmt: skip
        assert response.status_code == 201, response.content[:300]
    return _finish_sms(twilio, tag, submitted)


def _finish_sms(twilio: Fake, tag: str, submitted: dict[str, float]) -> dict:
    n = len(submitted)
    jobs = Job.objects.filter(kind="message", payload__text__startswith=f"{tag} ")
    wait(lambda: jobs.filter(status__in=FINAL).count() >= n, timeout=60 + n / 20, interval=0.05, what=f"{tag} jobs")
    failed = jobs.exclude(status=Job.Status.SUCCEEDED).values_list("status", "error")[:5]
    assert not failed, f"{tag}: jobs did not succeed: {list(failed)}"
    record = twilio.dump()
    assert len(record["messages"]) == n, f"{tag}: the fake accepted {len(record['messages'])} of {n}"
    figures = sms_figures(tag, record["messages"], submitted)
    figures["refused"] = sum(1 for status in record["statuses"] if status >= 300)  # 429s, errors
    figures["deferrals"] = sum(jobs.values_list("deferrals", flat=True))
    rows = jobs.values_list("started_at", "finished_at", "created_at", "payload")
    figures["run_ms"] = statistics.median((f - s).total_seconds() * 1000 for s, f, _, _ in rows)
    figures["pickup_ms"] = statistics.median((s - c).total_seconds() * 1000 for s, _, c, _ in rows)
    # Where a job's time goes: from its claim to the fake accepting it (queries, the limiter's wait, the
    # request), from then to its end (the answer, the ledger, the success).
    accepted = {text: at for _, text, at in record["messages"]}
    before = [accepted[p["text"]] - s.timestamp() for s, _, _, p in rows]
    after = [f.timestamp() - accepted[p["text"]] for _, f, _, p in rows]
    figures["claim_to_accepted_ms"] = statistics.median(before) * 1000
    figures["accepted_to_end_ms"] = statistics.median(after) * 1000
    span = max(f for _, f, _, _ in rows).timestamp() - min(s for s, _, _, _ in rows).timestamp()
    figures["in_flight"] = sum((f - s).total_seconds() for s, f, _, _ in rows) / span  # mean jobs running
    return figures


def plain_sms(twilio: Fake, tag: str) -> dict:
    twilio.reset()
    R.set("bench:done", 0)
    R.set("bench:failed", 0)
    for i, to in enumerate(numbers(SMS_N)):
        sms_plain.apply_async(args=[to, f"{tag} {i}"], queue="messages", priority=6)
    wait(lambda: int(R.get("bench:done") or 0) >= SMS_N, timeout=60 + SMS_N / 20, what="plain tasks to drain")
    assert not int(R.get("bench:failed")), f"{tag}: {int(R.get('bench:failed'))} plain tasks failed"
    record = twilio.dump()
    assert len(record["messages"]) == SMS_N, f"{tag}: the fake accepted {len(record['messages'])} of {SMS_N}"
    return sms_figures(tag, record["messages"])


# --- Discord ------------------------------------------------------------------------------------


def conveyor_discord(api: APIClient, discord: Fake, tag: str) -> dict:
    discord.reset()
    jobs = [{"kind": "message", "payload": {"channel": "discord", "to": CHANNELS[i % len(CHANNELS)],
                                             "text": f"{tag} {i}"}} for i in range(DISCORD_N)]  # fmt: skip
    start = time.time()
    for i in range(0, DISCORD_N, 50):
        assert api.post("/api/jobs/batch/", {"jobs": jobs[i : i + 50]}, format="json").status_code == 201
    query = Job.objects.filter(kind="message", payload__text__startswith=f"{tag} ")
    wait(lambda: query.filter(status__in=FINAL).count() >= DISCORD_N, interval=0.2, what="Discord jobs to end")
    failed = query.exclude(status=Job.Status.SUCCEEDED).values_list("status", "error")[:5]
    assert not failed, f"Discord jobs did not succeed: {list(failed)}"
    record = discord.dump()
    posted = [m for m in record["messages"] if m[1].startswith(f"{tag} ")]
    assert len(posted) == DISCORD_N, f"the fake accepted {len(posted)} of {DISCORD_N}"
    per_channel: dict[str, dict] = {}
    for channel in CHANNELS:
        path = f"/api/v10/channels/{channel}/messages"
        hits = sorted(at for p, _, at in record["rate_limited"] if p == path)
        accepted = sorted(at for c, _, at in posted if c == channel)
        per_channel[channel] = {
            "429": len(hits),
            "after_first": [round(at - hits[0], 3) for at in hits[1:]],
            "first_429_s": round(hits[0] - start, 2) if hits else None,
            "accepted": len(accepted),
            "max_window": max_in_window(accepted, BUCKET_WINDOW),
        }
    times = sorted(at for _, _, at in posted)
    per = -(-DISCORD_N // len(CHANNELS))  # messages per channel (the busiest)
    return {
        "n": DISCORD_N,
        "span": times[-1] - times[0],
        "ideal_span": (-(-per // BUCKET_LIMIT) - 1) * BUCKET_WINDOW,  # the first window is full at once
        "rate": DISCORD_N / (times[-1] - times[0]),
        "submit_to_last": times[-1] - start,
        "channels": per_channel,
        "other_429": [x for x in record["rate_limited"] if not x[0].endswith("/messages")],
        "deferrals": sum(query.values_list("deferrals", flat=True)),
    }


def main() -> None:
    _, api = prepare()
    twilio = Fake("twilio", *(["nodelay"] if os.environ.get("BENCH_MSG_TWILIO_NODELAY") else []))
    discord = Fake("discord", BUCKET_LIMIT, BUCKET_WINDOW)
    workers = start_workers(twilio, discord)
    fakes = {"twilio": twilio.proc, "discord": discord.proc}
    cpu: dict[str, WorkersCPU] = {}
    sms: dict[str, dict] = {}
    disc = None
    try:
        if SMS_N and "direct" in PHASES:
            with WorkersCPU(workers, **fakes) as cpu["direct 200/s"]:
                sms["direct"] = direct_sms(twilio, "direct", SMS_RATE)
            with WorkersCPU(workers, **fakes) as cpu["direct unlimited"]:
                sms["unlimited"] = direct_sms(twilio, "unlimited", None)
        if SMS_N and "plain" in PHASES:
            with WorkersCPU(workers, **fakes) as cpu["plain celery"]:
                sms["plain"] = plain_sms(twilio, "plain")
            R.delete(*R.keys("conveyor:rate:*") or ["none"])  # the limiter's state of the plain run
        if SMS_N and "conveyor" in PHASES:
            with WorkersCPU(workers, **fakes) as cpu["conveyor"]:
                sms["conveyor"] = conveyor_sms(api, twilio, "conveyor")
        if PACED_N and "paced" in PHASES:
            with WorkersCPU(workers, **fakes) as cpu["conveyor paced"]:
                sms["paced"] = paced_sms(api, twilio, "paced", SMS_RATE / 2)
        if DISCORD_N and "discord" in PHASES:
            with WorkersCPU(workers, **fakes) as cpu["discord"]:
                disc = conveyor_discord(api, discord, "discord")
    finally:
        stop_workers(workers)
        twilio.stop()
        discord.stop()
        reset()

    db_pool = f" (DB_POOL_SIZE={os.environ.get('BENCH_MSG_THREADS_DB_POOL', '8')})" if POOL == "threads" else ""
    print(f"\nmessage jobs, two workers -P {POOL} -c {CONCURRENCY}{db_pool}, SMS_RATE_PER_SECOND={SMS_RATE:g}, "
          "the fakes in processes of their own")  # fmt: skip
    if sms:
        print_sms(sms)
    if "paced" in sms:
        paced = sms["paced"]
        print(f"  submit -> accepted, {PACED_N} submitted one by one at {SMS_RATE / 2:g}/s: "
              f"p50 {paced['p50'] * 1000:.1f} ms, p95 {paced['p95'] * 1000:.1f} ms "
              f"(job pickup p50 {paced['pickup_ms']:.1f} ms, run p50 {paced['run_ms']:.1f} ms)")  # fmt: skip
    if disc:
        print_discord(disc)
    print("CPU: cores used over each phase (CPU seconds / wall-clock seconds); Redis script calls (EVALSHA)")
    for name, c in cpu.items():
        print(f"  {name:<17} {c.spent['wall']:6.1f} s: {c.cores()}; scripts {c.scripts}")
    for name in ("plain celery", "conveyor", "direct unlimited"):
        if name in cpu:
            print(f"  CPU ms per message, {name + ':':<17} {cpu[name].per_job(SMS_N)}; "
                  f"scripts {cpu[name].scripts / SMS_N:.1f}")  # fmt: skip


def print_sms(sms: dict[str, dict]) -> None:
    print(f"SMS, {SMS_N} messages (rate: first to last acceptance at the fake; max: most in any sliding 1 s)")
    for label, key in (
        (f"direct SDK, {DIRECT_THREADS} threads, unlimited", "unlimited"),
        (f"direct SDK, {DIRECT_THREADS} threads, {SMS_RATE:g}/s", "direct"),
        ("plain Celery task, same limiter", "plain"),
        ("through Conveyor (submit all)", "conveyor"),
    ):
        if f := sms.get(key):
            print(f"  {label:<40} {f['rate']:7.1f} /s  ratio to limit {f['rate'] / SMS_RATE:5.2f}  "
                  f"max in 1 s {f['max_1s']:4d}")  # fmt: skip
    if not {"conveyor", "direct", "plain", "unlimited"} <= sms.keys():
        return
    conveyor, direct, plain, unlimited = sms["conveyor"], sms["direct"], sms["plain"], sms["unlimited"]
    print(f"  Conveyor / direct at {SMS_RATE:g}/s: {conveyor['rate'] / direct['rate']:.2f}; "
          f"/ plain Celery: {conveyor['rate'] / plain['rate']:.2f}; / direct unlimited: "
          f"{conveyor['rate'] / unlimited['rate']:.2f}")  # fmt: skip
    met = conveyor["rate"] >= 0.9 * SMS_RATE
    print(f"  target >= {0.9 * SMS_RATE:g}/s (within 10% of the limit): {'met' if met else 'NOT met'}; "
          f"most in any 1 s {conveyor['max_1s']} (limit {SMS_RATE:g}, GCRA's burst of 1 allows {SMS_RATE + 1:g}): "
          f"{'met' if conveyor['max_1s'] <= SMS_RATE + 1 else 'NOT met'}")  # fmt: skip
    print(f"  submit -> accepted, all {SMS_N} submitted at once: p50 {conveyor['p50'] * 1000:.0f} ms, "
          f"p95 {conveyor['p95'] * 1000:.0f} ms (a perfect limiter, same submissions: p50 "
          f"{conveyor['ideal_p50'] * 1000:.0f} ms, p95 {conveyor['ideal_p95'] * 1000:.0f} ms); "
          f"deferrals {conveyor['deferrals']}, requests the fake refused {conveyor['refused']}")  # fmt: skip
    print(f"  a job, median: claim -> accepted {conveyor['claim_to_accepted_ms']:.0f} ms, accepted -> end "
          f"{conveyor['accepted_to_end_ms']:.0f} ms; jobs running at once, mean {conveyor['in_flight']:.1f} "
          f"(of {2 * int(CONCURRENCY)} slots)")  # fmt: skip


def print_discord(disc: dict) -> None:
    print(f"Discord, {DISCORD_N} messages to {len(CHANNELS)} channels, buckets {BUCKET_LIMIT} per {BUCKET_WINDOW:g} s")
    strict = True
    for channel, c in disc["channels"].items():
        strict &= not c["after_first"]
        first = f" (the first {c['first_429_s']} s after submitting" if c["429"] else ""
        later = f"; the others {c['after_first']} s after it)" if c["after_first"] else (")" if first else "")
        print(f"  channel {channel}: {c['accepted']} accepted, 429s {c['429']}{first}{later}, "
              f"most in a {BUCKET_WINDOW:g} s window {c['max_window']}")  # fmt: skip
    if disc["other_429"]:
        print(f"  429s on other routes: {disc['other_429']}")
    ideal_rate = len(CHANNELS) * BUCKET_LIMIT / BUCKET_WINDOW
    print(f"  rate {disc['rate']:.2f} /s (first to last acceptance, {disc['span']:.1f} s) against the ideal "
          f"{ideal_rate:g} /s: {disc['rate'] / ideal_rate:.2f}; the shortest span these allow "
          f"{disc['ideal_span']:.0f} s (the first window is full at once): "
          f"{disc['ideal_span'] / disc['span']:.2f} of it; "
          f"submit -> last {disc['submit_to_last']:.1f} s; deferrals {disc['deferrals']}")  # fmt: skip
    print(f"  target, no 429 after a bucket's first: {'met' if strict else 'NOT met'}")


if __name__ == "__main__":
    main()
