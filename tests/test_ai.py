"""ai_generate jobs through a real worker against a local OpenAI/Anthropic server; BYOK keys."""

import json
import logging
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, override_settings
from rest_framework.test import APIClient

from apps.credentials.models import Credential
from apps.credentials.services import key_for, key_for_orm, store_credential
from apps.jobs.models import Job, JobEvent, LogChunk
from tasks.context import PermanentError
from tests.conftest import SERVER_ANTHROPIC_KEY, SERVER_OPENAI_KEY, WorkerProcess, sse_events, wait_final, wait_for
from tests.fake_llm import FakeLLM

USER_OPENAI_KEY = "sk-user-openai-abcdef0123456789"
USER_ANTHROPIC_KEY = "sk-ant-user-abcdef0123456789"


def generate(api: APIClient, **body: object) -> object:
    return api.post("/api/ai/generate/", body, format="json")


def generated(api: APIClient, **body: object) -> Job:
    response = generate(api, **body)
    assert response.status_code == 201, response.content
    return wait_final(response.json()["id"], timeout=30)


def store_key(api: APIClient, provider: str, key: str) -> dict:
    response = api.post("/api/credentials/", {"provider": provider, "key": key}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_a_job_uses_the_servers_key_until_the_user_stores_their_own(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    job = generated(api, prompt="first", provider="openai", model="gpt-test")

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
    job = generated(api, prompt="second", provider="openai")

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert llm.requests[-1].key == USER_OPENAI_KEY
    assert llm.requests[-1].body["model"] == "gpt-4o-mini"  # OPENAI_DEFAULT_MODEL


@pytest.mark.django_db(transaction=True)
def test_anthropic_gets_the_personas_system_prompt_and_the_users_key(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    store_key(api, "anthropic", USER_ANTHROPIC_KEY)

    job = generated(
        api, provider="anthropic", persona="reviewer", messages=[{"role": "user", "content": "review x = 1"}]
    )

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
    job_id = generate(api, prompt="stream please").json()["id"]

    body = b"".join(api.get(f"/api/jobs/{job_id}/stream/")).decode()

    deltas = [data["delta"] for event, data in sse_events(body) if event == "text"]
    final = Job.objects.get(pk=job_id)
    assert final.status == Job.Status.SUCCEEDED
    assert "".join(deltas) == final.result["text"] == "".join(f"word{i} " for i in range(20))
    assert '"message": "generating"' in body  # progress advanced while the text came in
    assert body.rstrip().rsplit("\n\n", 1)[-1].startswith("event: end")


@pytest.mark.django_db(transaction=True)
def test_a_stream_opened_midway_starts_with_the_text_so_far(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    llm.reset(tokens=[f"t{i} " for i in range(30)], token_delay=0.05)
    job_id = generate(api, prompt="late reader").json()["id"]
    # Open the stream only once part of the text has gone by.
    wait_for(lambda: Job.objects.get(pk=job_id).progress_message == "generating", what="generation to start")
    time.sleep(0.3)

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
    first = generate(api, prompt="same", temperature=0.5)
    again = generate(api, prompt="same", temperature=0.5)
    via_jobs = api.post(
        "/api/jobs/", {"kind": "ai_generate", "payload": {"prompt": "same", "temperature": 0.5}}, format="json"
    )
    forced = generate(api, prompt="same", temperature=0.5, dedupe=False)
    someone_else = generate(other_api, prompt="same", temperature=0.5)

    assert first.status_code == 201
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    assert (via_jobs.status_code, via_jobs.json()["id"]) == (200, first.json()["id"])
    assert forced.status_code == 201
    assert forced.json()["id"] != first.json()["id"]
    assert someone_else.status_code == 201
    for response in (first, forced, someone_else):
        assert wait_final(response.json()["id"]).status == Job.Status.SUCCEEDED
    assert len(llm.requests) == 3
    after_success = generate(api, prompt="same", temperature=0.5)
    assert (after_success.status_code, after_success.json()["id"]) == (200, first.json()["id"])


@pytest.mark.django_db(transaction=True)
def test_a_429_with_retry_after_is_retried_after_that_long(worker: WorkerProcess, api: APIClient, llm: FakeLLM) -> None:
    llm.fail_next(429, "slow down", {"Retry-After": "1"})

    job = generated(api, prompt="rate limited")

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.attempts == 2
    assert len(llm.requests) == 2
    assert llm.requests[1].at - llm.requests[0].at >= 1.0
    retry = job.events.get(type="retrying")
    assert retry.data["delay_s"] == 1.0
    assert "429" in retry.message


@pytest.mark.django_db(transaction=True)
def test_a_401_fails_at_once_with_the_providers_message_and_no_key(
    worker: WorkerProcess, api: APIClient, llm: FakeLLM
) -> None:
    store_key(api, "openai", USER_OPENAI_KEY)
    llm.fail_next(401)  # the body echoes the key it was sent

    job = generated(api, prompt="bad key")

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
    jobs = [
        generated(api, prompt="leak 1"),
        generated(api, prompt="leak 2", provider="anthropic"),
        generated(api, prompt="leak 3"),
    ]
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
def test_rotation_re_encrypts_every_key_under_the_first_key(user: User) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(CREDENTIALS_KEYS=[old]):
        Credential.objects.create(owner=user, provider="openai", encrypted_key=Fernet(old).encrypt(b"sk-x").decode())

    with override_settings(CREDENTIALS_KEYS=[new, old]):
        call_command("rotate_credentials")
        assert key_for(user.pk, "openai") == "sk-x"

    with override_settings(CREDENTIALS_KEYS=[new]):  # the old key can go
        assert key_for(user.pk, "openai") == "sk-x"
    token = Credential.objects.get().encrypted_key
    with pytest.raises(InvalidToken):
        Fernet(old).decrypt(token.encode())


@pytest.mark.django_db
def test_the_written_out_key_query_reads_what_the_orm_reads(user: User, other_user: User) -> None:
    store_credential(user, "openai", "sk-user-openai-1")
    store_credential(other_user, "openai", "sk-other-openai-2")
    store_credential(user, "anthropic", "sk-ant-user-3")

    for owner, provider in [(user, "openai"), (other_user, "openai"), (user, "anthropic"), (other_user, "anthropic")]:
        assert key_for(owner.pk, provider) == key_for_orm(owner.pk, provider)
    assert (key_for(user.pk, "openai"), key_for(other_user.pk, "anthropic")) == ("sk-user-openai-1", None)


@pytest.mark.django_db
def test_a_job_without_any_key_for_its_provider_fails_at_once(user: User) -> None:
    from tasks.context import Context
    from tasks.kinds.ai_generate import handle

    job = Job(owner=user, kind="ai_generate", payload={"provider": "anthropic", "model": "m"})

    with override_settings(ANTHROPIC_API_KEY=""), pytest.raises(PermanentError, match="no credential for provider"):
        handle(Context(job, lambda percent, message="": None, time.monotonic() + 60))


@pytest.mark.django_db
def test_credentials_are_write_only_per_user_and_can_be_replaced_and_deleted(
    api: APIClient, other_api: APIClient
) -> None:
    created = store_key(api, "openai", "sk-first-0000")
    replaced = api.post("/api/credentials/", {"provider": "openai", "key": "sk-second-1111"}, format="json")

    assert replaced.status_code == 200
    assert replaced.json()["last4"] == "1111"
    listed = api.get("/api/credentials/").json()
    assert [(c["provider"], c["last4"]) for c in listed] == [("openai", "1111")]
    assert "sk-second" not in json.dumps(listed)
    assert other_api.get(f"/api/credentials/{created['id']}/").status_code == 404
    assert other_api.delete(f"/api/credentials/{created['id']}/").status_code == 404
    bad = api.post("/api/credentials/", {"provider": "nope", "key": "short"}, format="json")
    assert bad.status_code == 400
    assert set(bad.json()) == {"provider", "key"}
    assert api.delete(f"/api/credentials/{created['id']}/").status_code == 204
    assert Credential.objects.count() == 0


@pytest.mark.django_db
def test_the_admin_never_shows_a_stored_key(client: Client, user: User) -> None:
    client.force_login(User.objects.create_superuser("root", "root@x.test", "pw"))
    store = client.post(
        "/admin/credentials/credential/add/", {"owner": user.pk, "provider": "openai", "key": "sk-admin-secret-9876"}
    )
    assert store.status_code == 302
    credential = Credential.objects.get()

    html = client.get(f"/admin/credentials/credential/{credential.pk}/change/").content.decode()
    listing = client.get("/admin/credentials/credential/").content.decode()

    assert "sk-admin-secret" not in html + listing
    assert credential.encrypted_key not in html
    assert "…9876" in listing
    assert key_for(user.pk, "openai") == "sk-admin-secret-9876"


@pytest.mark.django_db
def test_personas_are_listed_and_an_unknown_one_is_a_400(api: APIClient) -> None:
    names = {p["name"] for p in api.get("/api/personas/").json()}

    assert {"assistant", "reviewer"} <= names
    response = generate(api, prompt="hi", persona="nobody")
    assert response.status_code == 400, response.content
    assert "Unknown persona" in response.json()["payload"]["persona"][0]


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
    response = generate(api, **body)

    assert response.status_code == 400
    assert field in response.json()["payload"]
    assert Job.objects.count() == 0


def test_the_sample_personas_are_valid_json() -> None:
    folder = Path(__file__).resolve().parent.parent / "personas"
    for path in folder.glob("*.json"):
        assert {"name", "system_prompt"} <= set(json.loads(path.read_text()))


@pytest.mark.django_db(transaction=True)
def test_a_stream_cut_off_midway_is_retried(worker: WorkerProcess, api: APIClient, llm: FakeLLM) -> None:
    llm.cut_next()

    job = generated(api, prompt="cut me off")

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.result["text"] == "Hello, world!"
    assert "openai: connection failed" in job.events.get(type="retrying").message
