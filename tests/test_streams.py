"""Event streams through the web process as deployed (gunicorn + uvicorn, ASGI): many open streams hold
no thread, the API keeps answering beside them, and each user's open streams are capped."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from apps.jobs import lifecycle
from tests.conftest import Web
from tests.factories import api_token, make_job, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def web(process_env: dict, tmp_path: Path) -> Iterator[Web]:
    server = Web({**process_env, "JOBS_MAX_STREAMS_PER_USER": "3", "JOBS_READ_RATE": "100000/min"}, tmp_path)
    yield server
    server.stop()


async def open_stream(port: int, token: str, job_id: object) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /api/jobs/{job_id}/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n".encode()
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    return status, reader, writer


async def next_event(reader: asyncio.StreamReader) -> str:
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if line.startswith(b"event: "):
            return line[len(b"event: ") :].strip().decode()
        if not line:
            return ""


@pytest.mark.usefixtures("no_shared_worker")
def test_many_open_streams_hold_no_thread_and_the_api_answers_beside_them(web: Web) -> None:
    # Each watcher's own job, which stays queued: no worker runs in these tests.
    watchers = [make_user(f"watcher{i}") for i in range(60)]
    tokens = [api_token(watcher) for watcher in watchers]
    jobs = [make_job(watcher) for watcher in watchers]

    async def scenario() -> tuple[list[str], list[float], list[str]]:
        opened = await asyncio.gather(
            *(open_stream(web.port, token, job.pk) for token, job in zip(tokens, jobs, strict=True))
        )
        firsts = await asyncio.gather(*(next_event(reader) for _, reader, _ in opened))
        reads = []
        for _ in range(20):  # each stream would hold a thread of a threaded server
            started = time.monotonic()
            status, _ = await asyncio.to_thread(web.request, "GET", "/api/jobs/", tokens[0])
            assert status == 200
            reads.append(time.monotonic() - started)
        for job in jobs:
            await asyncio.to_thread(lifecycle.cancel, job.pk)
        lasts = []
        for _, reader, _ in opened:
            events = []
            while (event := await next_event(reader)) not in ("end", ""):
                events.append(event)
            lasts.append(event)
        for _, _, writer in opened:
            writer.close()
        return firsts, reads, lasts

    firsts, reads, lasts = asyncio.run(scenario())

    assert firsts == ["status"] * 60
    assert max(reads) < 2.0, reads
    assert lasts == ["end"] * 60


@pytest.mark.usefixtures("no_shared_worker")
def test_a_user_over_the_stream_cap_gets_429_and_a_closed_stream_frees_its_place(web: Web) -> None:
    watcher = make_user("watcher")
    token, job = api_token(watcher), make_job(watcher)  # a job that stays queued: no worker runs here

    async def scenario() -> tuple[list[int], int, int]:
        opened = [await open_stream(web.port, token, job.pk) for _ in range(3)]
        over, _, over_writer = await open_stream(web.port, token, job.pk)
        over_writer.close()
        _, _, writer = opened.pop()
        writer.close()  # the client goes away
        again = 429
        deadline = time.monotonic() + 10
        while again == 429 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            again, _, again_writer = await open_stream(web.port, token, job.pk)
            again_writer.close()
        for _, _, writer in opened:
            writer.close()
        return [status for status, _, _ in opened], over, again

    opened, over, again = asyncio.run(scenario())

    assert opened == [200, 200]
    assert over == 429
    assert again == 200
    lifecycle.cancel(job.pk)


def test_a_bad_offset_or_an_unknown_job_is_refused_in_json(web: Web, user: User) -> None:
    token = api_token(user)
    job = make_job(user)
    other = api_token(make_user("stranger"))

    assert web.request("GET", f"/api/jobs/{job.pk}/stream/?offset=-1", token) == (
        400,
        {"offset": ["A non-negative integer is required."]},
    )
    assert web.request("GET", f"/api/jobs/{job.pk}/stream/", other)[0] == 404
    assert web.request("GET", f"/api/jobs/{job.pk}/stream/", "")[0] == 401
    assert web.request("GET", f"/api/jobs/{job.pk}/log/?offset=abc", token)[0] == 400
    lifecycle.cancel(job.pk)
