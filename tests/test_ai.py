"""ai_generate jobs through a real worker against a local OpenAI/Anthropic server, with the server's
keys or the user's own (BYOK; the credentials themselves: tests/test_credentials.py)."""

import json
import logging
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from rest_framework.test import APIClient

from apps.credentials.models import Credential
from apps.jobs import live
from apps.jobs.models import Job, JobEvent, LogChunk
from tasks.context import PermanentError
from tests.conftest import SERVER_ANTHROPIC_KEY, SERVER_OPENAI_KEY, WorkerProcess, sse_events, wait_final, wait_for
from tests.factories import make_credential, make_job, submit
from tests.fake_llm import FakeLLM

USER_OPENAI_KEY = "sk-user-openai-abcdef0123456789"
USER_ANTHROPIC_KEY = "sk-ant-user-abcdef0123456789"


def store_key(api: APIClient, provider: str, key: str) -> dict:
    response = api.post("/api/credentials/", {"provider": provider, "key": key}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_a_job_uses_the_servers_key_until_the_user_stores_their_own(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    request = {"prompt": "first", "provider": "openai", "model": "gpt-test"}

    job = wait_final(submit(api, "ai_generate", request, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.result == {
        "text": "Hello, world!",
        "provider": "openai",
        "model": "gpt-test",
        "usage": {"input_tokens": 5, "output_tokens": 4},
        "finish_reason": "stop",
    }
    assert llm.requests[-1].key == SERVER_OPENAI_KEY
    assert llm.requests[-1].body["messages"] == [{"role": "user", "content": "first"}]
    assert llm.requests[-1].body["stream"] is True

    stored = store_key(api, "openai", USER_OPENAI_KEY)
    assert stored["last4"] == "6789"
    assert "key" not in stored
    request = {"prompt": "second", "provider": "openai"}
    job = wait_final(submit(api, "ai_generate", request, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert llm.requests[-1].key == USER_OPENAI_KEY
    assert llm.requests[-1].body["model"] == "gpt-4o-mini"  # OPENAI_DEFAULT_MODEL


@pytest.mark.django_db(transaction=True)
def test_anthropic_gets_the_personas_system_prompt_and_the_users_key(
    worker: WorkerProcess, api: APIClient, user: User, llm: FakeLLM
) -> None:
    make_credential(user, "anthropic", USER_ANTHROPIC_KEY)
    messages = [{"role": "user", "content": "review x = 1"}]
    request = {"provider": "anthropic", "persona": "reviewer", "messages": messages}

    job = wait_final(submit(api, "ai_generate", request, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.result["text"] == "Hello, world!"
    assert job.result["finish_reason"] == "end_turn"
    request = llm.requests[-1]
    assert request.path == "/v1/messages"
    assert request.key == USER_ANTHROPIC_KEY
    assert request.body["system"].startswith("You are a careful code reviewer")
    assert request.body["temperature"] == 0.0
    assert request.body["messages"] == [{"role": "user", "content": "review x = 1"}]
    assert job.payload["persona"] == "reviewer"


@pytest.mark.django_db(transaction=True)
def test_streamed_text_arrives_in_order_on_the_jobs_event_stream(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    llm.reset(tokens=[f"word{i} " for i in range(20)], token_delay=0.05)
    job_id = submit(api, "ai_generate", {"prompt": "stream please"}, shortcut=True)["id"]

    events = sse_events(b"".join(api.get(f"/api/jobs/{job_id}/stream/")).decode())

    deltas = [data["delta"] for event, data in events if event == "text"]
    final = Job.objects.get(pk=job_id)
    assert final.status == Job.Status.SUCCEEDED
    assert "".join(deltas) == final.result["text"] == "".join(f"word{i} " for i in range(20))
    # progress advanced while the text came in
    assert any(data["message"] == "generating" for event, data in events if event == "progress")
    assert events[-1][0] == "end"


@pytest.mark.django_db(transaction=True)
def test_a_stream_opened_midway_starts_with_the_text_so_far(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    llm.reset(tokens=[f"t{i} " for i in range(30)], token_delay=0.05)
    job_id = submit(api, "ai_generate", {"prompt": "late reader"}, shortcut=True)["id"]
    # Open the stream only once part of the text has gone by (and was kept for readers who come late).
    wait_for(lambda: len(live.text_so_far(job_id, 1)) > len("t0 "), what="part of the text to be generated")

    body = b"".join(api.get(f"/api/jobs/{job_id}/stream/")).decode()

    texts = [data for event, data in sse_events(body) if event == "text"]
    assert len(texts[0]["delta"]) > len("t0 ")  # the first event carries what was generated before
    assert texts[0]["offset"] == 0
    assert "".join(t["delta"] for t in texts) == "".join(f"t{i} " for i in range(30))
    assert wait_final(job_id).result["text"] == "".join(f"t{i} " for i in range(30))


@pytest.mark.django_db(transaction=True)
def test_an_identical_request_returns_the_first_job_unless_dedupe_is_off(
    worker: WorkerProcess, api: APIClient, other_api: APIClient, llm: FakeLLM
) -> None:
    llm.reset(token_delay=0.1)
    same = {"prompt": "same", "temperature": 0.5}
    first = submit(api, "ai_generate", same, shortcut=True, expect=201)
    again = submit(api, "ai_generate", same, shortcut=True, expect=200)
    via_jobs = submit(api, "ai_generate", same, expect=200)  # through POST /api/jobs/
    forced = submit(api, "ai_generate", {**same, "dedupe": False}, shortcut=True, expect=201)
    someone_else = submit(other_api, "ai_generate", same, shortcut=True, expect=201)

    assert again["id"] == first["id"]
    assert via_jobs["id"] == first["id"]
    assert forced["id"] != first["id"]
    for body in (first, forced, someone_else):
        assert wait_final(body["id"]).status == Job.Status.SUCCEEDED
    assert len(llm.requests) == 3
    after_success = submit(api, "ai_generate", same, shortcut=True, expect=200)
    assert after_success["id"] == first["id"]


@pytest.mark.django_db(transaction=True)
def test_a_429_with_retry_after_is_retried_after_that_long(worker: WorkerProcess, api: APIClient, llm: FakeLLM) -> None:
    llm.fail_next(429, "slow down", {"Retry-After": "1"})

    job = wait_final(submit(api, "ai_generate", {"prompt": "rate limited"}, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.attempts == 2
    assert len(llm.requests) == 2
    assert llm.requests[1].at - llm.requests[0].at >= 1.0
    retry = job.events.get(type="retrying")
    assert retry.data["delay_s"] == 1.0
    assert "429" in retry.message


@pytest.mark.django_db(transaction=True)
def test_a_401_fails_at_once_with_the_providers_message_and_no_key(
    worker: WorkerProcess, api: APIClient, user: User, llm: FakeLLM
) -> None:
    make_credential(user, "openai", USER_OPENAI_KEY)
    llm.fail_next(401)  # the body echoes the key it was sent

    job = wait_final(submit(api, "ai_generate", {"prompt": "bad key"}, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.FAILED
    assert job.attempts == 1
    assert len(llm.requests) == 1
    assert job.error["type"] == "PermanentError"
    assert "openai refused the request (401)" in job.error["message"]
    assert "[redacted]" in job.error["message"]
    assert USER_OPENAI_KEY not in job.error["message"]


@pytest.mark.django_db(transaction=True)
def test_no_key_appears_in_any_response_log_record_or_job_field(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    responses = [store_key(api, "openai", USER_OPENAI_KEY), store_key(api, "anthropic", USER_ANTHROPIC_KEY)]
    llm.fail_next(403)
    llm.fail_next(500)
    requests = [{"prompt": "leak 1"}, {"prompt": "leak 2", "provider": "anthropic"}, {"prompt": "leak 3"}]
    jobs = [wait_final(submit(api, "ai_generate", request, shortcut=True)["id"], timeout=30) for request in requests]
    assert [j.status for j in jobs] == [Job.Status.FAILED, Job.Status.SUCCEEDED, Job.Status.SUCCEEDED]
    for job in jobs:
        responses += [api.get(f"/api/jobs/{job.id}/").json(), api.get(f"/api/jobs/{job.id}/events/").json()]
    responses += [api.get("/api/jobs/").json(), api.get("/api/credentials/").json()]

    haystacks = [json.dumps(responses)]
    haystacks += [json.dumps(list(Job.objects.values()), default=str)]
    haystacks += [json.dumps(list(JobEvent.objects.values()), default=str)]
    haystacks += [json.dumps(list(LogChunk.objects.values()), default=str)]
    haystacks += [json.dumps(list(Credential.objects.values()), default=str)]
    haystacks += [record.getMessage() for record in caplog.records]
    haystacks += [worker.log_path.read_text(errors="replace")]
    for secret in (USER_OPENAI_KEY, USER_ANTHROPIC_KEY, SERVER_OPENAI_KEY, SERVER_ANTHROPIC_KEY):
        for haystack in haystacks:
            assert secret not in haystack
    assert {r.key for r in llm.requests} == {USER_OPENAI_KEY, USER_ANTHROPIC_KEY}  # the keys were really used


@pytest.mark.django_db
def test_a_job_without_any_key_for_its_provider_fails_at_once(user: User) -> None:
    from tasks.context import Context
    from tasks.kinds.ai_generate import handle

    job = make_job(user, kind="ai_generate", payload={"provider": "anthropic", "model": "m"})

    with override_settings(ANTHROPIC_API_KEY=""), pytest.raises(PermanentError, match="no credential for provider"):
        handle(Context(job, lambda percent, message="": None, time.monotonic() + 60))


@pytest.mark.django_db
def test_personas_are_listed_and_an_unknown_one_is_a_400(api: APIClient) -> None:
    names = {p["name"] for p in api.get("/api/personas/").json()}

    assert {"assistant", "reviewer"} <= names
    errors = submit(api, "ai_generate", {"prompt": "hi", "persona": "nobody"}, shortcut=True, expect=400)
    assert "Unknown persona" in errors["payload"]["persona"][0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"prompt": "a", "provider": "mystery"}, "provider"),
        ({"messages": [{"role": "robot", "content": "b"}]}, "messages"),
        ({"prompt": "a", "temperature": 5}, "temperature"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "surprise": 1}, "surprise"),
    ],
)
def test_a_bad_ai_request_is_a_400_naming_the_field(api: APIClient, body: dict, field: str) -> None:
    errors = submit(api, "ai_generate", body, shortcut=True, expect=400)

    assert field in errors["payload"]
    assert Job.objects.count() == 0


def test_the_sample_personas_are_valid_json() -> None:
    folder = Path(__file__).resolve().parent.parent / "personas"
    paths = sorted(folder.glob("*.json"))
    assert paths, f"no persona in {folder}"  # a check of nothing proves nothing
    for path in paths:
        assert {"name", "system_prompt"} <= set(json.loads(path.read_text()))


@pytest.mark.django_db(transaction=True)
def test_a_stream_cut_off_midway_is_retried(worker: WorkerProcess, api: APIClient, llm: FakeLLM) -> None:
    llm.cut_next()

    job = wait_final(submit(api, "ai_generate", {"prompt": "cut me off"}, shortcut=True)["id"], timeout=30)

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result["text"] == "Hello, world!"
    assert "openai: connection failed" in job.events.get(type="retrying").message
