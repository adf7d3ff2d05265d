"""The REST contract: what a client sees for good and bad requests. No worker needed here: these
tests run inside a transaction that never commits, so nothing is published."""

import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from apps.jobs.api.serializers import JobSerializer
from apps.jobs.models import Job, JobEvent
from tests.conftest import client_for
from tests.factories import make_job, make_user, submit

pytestmark = pytest.mark.django_db

ECHO = {"kind": "echo", "payload": {"message": "hello"}}
CONTRACT_FIELDS = {
    "id", "kind", "priority", "status", "payload", "result", "error", "progress", "progress_message", "attempts",
    "max_attempts", "timeout_seconds", "run_at", "idempotency_key", "callback_url", "parent", "dead_lettered",
    "created_at", "queued_at", "started_at", "finished_at", "worker", "owner",
}  # fmt: skip


def test_a_submitted_job_is_stored_queued_with_the_kinds_defaults(api: APIClient, user: User) -> None:
    response = api.post("/api/jobs/", ECHO, format="json")

    assert response.status_code == 201
    body = response.json()
    assert set(body) == CONTRACT_FIELDS
    assert body["status"] == "queued"
    assert body["priority"] == "normal"
    assert body["payload"] == {"message": "hello", "sleep_ms": 0, "fail_times": 0, "progress_steps": 0}
    assert body["owner"] == "alice"
    job = Job.objects.get(pk=body["id"])
    assert (job.owner, job.max_attempts, job.timeout_seconds) == (user, 3, 60)
    assert list(job.events.values_list("type", flat=True)) == ["queued"]


def test_a_job_with_a_future_run_at_is_scheduled(api: APIClient) -> None:
    response = api.post("/api/jobs/", {**ECHO, "run_at": "2999-01-01T00:00:00Z"}, format="json")

    assert response.status_code == 201
    assert response.json()["status"] == "scheduled"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "nope", "payload": {}}, "kind"),
        ({"payload": {"message": "x"}}, "kind"),
        ({"kind": "echo"}, "payload"),
        ({"kind": "echo", "payload": []}, "payload"),
        ({"kind": "echo", "payload": {"message": "x"}, "priority": "urgent"}, "priority"),
        ({"kind": "echo", "payload": {"message": "x"}, "max_attempts": 0}, "max_attempts"),
        ({"kind": "echo", "payload": {"message": "x"}, "timeout_seconds": 10**9}, "timeout_seconds"),
        ({"kind": "echo", "payload": {"message": "x"}, "callback_url": "not a url"}, "callback_url"),
        ({"kind": "echo", "payload": {"message": "x"}, "callback_url": "http://10.0.0.1/hook"}, "callback_url"),
        ({"kind": "echo", "payload": {"message": "x"}, "run_at": "tomorrow"}, "run_at"),
        ({"kind": "echo", "payload": {"message": "x"}, "parent": "00000000-0000-0000-0000-000000000000"}, "parent"),
    ],
)
def test_an_invalid_submission_is_a_400_naming_the_field(api: APIClient, body: dict, field: str) -> None:
    response = api.post("/api/jobs/", body, format="json")

    assert response.status_code == 400
    assert field in response.json()
    assert Job.objects.count() == 0


def test_payload_errors_name_the_payload_field(api: APIClient) -> None:
    response = api.post("/api/jobs/", {"kind": "echo", "payload": {"sleep_ms": -1, "colour": "red"}}, format="json")

    assert response.status_code == 400
    errors = response.json()["payload"]
    assert set(errors) >= {"message", "sleep_ms"}


def test_an_unknown_payload_field_is_refused(api: APIClient) -> None:
    response = api.post("/api/jobs/", {"kind": "echo", "payload": {"message": "x", "sleep": 5}}, format="json")

    assert response.status_code == 400
    assert response.json() == {"payload": {"sleep": ["Unknown field."]}}


def test_malformed_json_is_a_400(api: APIClient) -> None:
    response = api.post("/api/jobs/", '{"kind": "echo", ', content_type="application/json")

    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_a_payload_over_one_mebibyte_is_a_413(api: APIClient) -> None:
    big = {"kind": "echo", "payload": {"message": "x" * (1024 * 1024)}}

    response = api.post("/api/jobs/", json.dumps(big), content_type="application/json")

    assert response.status_code == 413
    assert Job.objects.count() == 0


def test_a_request_over_the_body_limit_is_a_413(api: APIClient, settings: object) -> None:
    settings.JOBS_MAX_REQUEST_BYTES = 1000

    response = api.post("/api/jobs/", {**ECHO, "payload": {"message": "x" * 2000}}, format="json")

    assert response.status_code == 413


def test_requests_without_a_valid_token_are_401(user: User) -> None:
    assert APIClient().get("/api/jobs/").status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert bad.get("/api/jobs/").status_code == 401
    assert bad.post("/api/jobs/", ECHO, format="json").status_code == 401


def test_a_user_never_sees_or_touches_another_users_job(api: APIClient, other_api: APIClient) -> None:
    job_id = submit(api, **ECHO)["id"]

    assert other_api.get(f"/api/jobs/{job_id}/").status_code == 404
    assert other_api.get(f"/api/jobs/{job_id}/events/").status_code == 404
    assert other_api.post(f"/api/jobs/{job_id}/cancel/").status_code == 404
    assert other_api.post(f"/api/jobs/{job_id}/retry/").status_code == 404
    assert other_api.get("/api/jobs/").json()["results"] == []
    assert Job.objects.get(pk=job_id).status == "queued"


def test_staff_see_every_users_jobs(api: APIClient) -> None:
    job_id = submit(api, **ECHO)["id"]
    staff = client_for(make_user("ops", staff=True))

    assert staff.get(f"/api/jobs/{job_id}/").status_code == 200


def test_a_repeated_idempotency_key_returns_the_first_job(api: APIClient, other_api: APIClient) -> None:
    first = api.post("/api/jobs/", ECHO, format="json", HTTP_IDEMPOTENCY_KEY="order-42")
    again = api.post(
        "/api/jobs/", {**ECHO, "payload": {"message": "different"}}, format="json", HTTP_IDEMPOTENCY_KEY="order-42"
    )
    in_body = api.post("/api/jobs/", {**ECHO, "idempotency_key": "order-42"}, format="json")
    someone_else = other_api.post("/api/jobs/", ECHO, format="json", HTTP_IDEMPOTENCY_KEY="order-42")

    assert first.status_code == 201
    assert again.status_code == 200
    assert in_body.status_code == 200
    assert again.json()["id"] == in_body.json()["id"] == first.json()["id"]
    assert again.json()["payload"]["message"] == "hello"
    assert someone_else.status_code == 201  # keys are per user
    assert Job.objects.count() == 2


def test_the_list_filters_and_pages_with_a_cursor(api: APIClient) -> None:
    for i in range(5):
        submit(api, **ECHO, priority="high" if i % 2 else "low")

    page = api.get("/api/jobs/", {"limit": 2}).json()
    assert set(page) == {"next", "previous", "results"}
    assert len(page["results"]) == 2
    seen = [job["id"] for job in page["results"]]
    while page["next"]:
        page = api.get(page["next"]).json()
        seen += [job["id"] for job in page["results"]]
    assert len(set(seen)) == 5

    high = api.get("/api/jobs/", {"priority": "high"}).json()["results"]
    assert len(high) == 2
    assert api.get("/api/jobs/", {"status": "queued", "kind": "echo"}).json()["results"].__len__() == 5
    assert api.get("/api/jobs/", {"dead_lettered": "true"}).json()["results"] == []
    assert api.get("/api/jobs/", {"status": "bogus"}).status_code == 400


def test_a_batch_is_all_created_or_none(api: APIClient) -> None:
    good = api.post("/api/jobs/batch/", {"jobs": [ECHO, {**ECHO, "priority": "critical"}]}, format="json")
    assert good.status_code == 201
    assert [job["priority"] for job in good.json()["jobs"]] == ["normal", "critical"]
    assert Job.objects.count() == 2
    assert JobEvent.objects.count() == 2

    bad = api.post("/api/jobs/batch/", {"jobs": [ECHO, {"kind": "echo", "payload": {}}]}, format="json")
    assert bad.status_code == 400
    assert bad.json()["jobs"]["1"]["payload"] == {"message": ["This field is required."]}
    assert api.post("/api/jobs/batch/", {"jobs": []}, format="json").status_code == 400
    assert Job.objects.count() == 2


def test_a_batch_stores_the_same_rows_as_single_submissions(api: APIClient) -> None:
    # A batch is written with COPY, a single job with one INSERT statement: the rows must not differ.
    parent = submit(api, **ECHO)["id"]
    specs = [
        {"kind": "echo", "payload": {"message": 'ünïcode \\ "quoted"\n\ttabbed'}, "priority": "low"},
        {**ECHO, "run_at": "2999-01-01T00:00:00Z", "max_attempts": 7, "timeout_seconds": 12},
        {**ECHO, "idempotency_key": "key-1", "callback_url": "http://127.0.0.1:9/hook", "parent": parent},
        {"kind": "lint", "payload": {"source": {"files": {"a.py": "x = 1\n"}}, "env": {"A": "b"}}},
    ]
    single = [api.post("/api/jobs/", spec, format="json").json()["id"] for spec in specs]
    Job.objects.filter(pk__in=single).update(idempotency_key=None)  # so that the batch may use the key again
    batch = [job["id"] for job in api.post("/api/jobs/batch/", {"jobs": specs}, format="json").json()["jobs"]]

    def stored(ids: list[str]) -> list[dict]:
        rows = []
        for job in Job.objects.filter(pk__in=ids).order_by("priority", "kind", "run_at", "parent"):
            row = {f.attname: getattr(job, f.attname) for f in Job._meta.concrete_fields}
            for name in ("id", "created_at", "queued_at"):
                row[name] = row[name] is not None  # differ between the two, but set or not alike
            del row["idempotency_key"]  # cleared on the single ones; checked below
            row["events"] = list(job.events.values_list("type", "status", "message", "data"))
            rows.append(row)
        return rows

    assert len(set(batch) - set(single)) == 4
    assert stored(batch) == stored(single)
    assert Job.objects.get(pk=batch[2]).idempotency_key == "key-1"


def test_a_batch_over_the_limit_is_refused(api: APIClient, settings: object) -> None:
    settings.JOBS_MAX_BATCH = 3

    response = api.post("/api/jobs/batch/", {"jobs": [ECHO] * 4}, format="json")

    assert response.status_code == 400
    assert "jobs" in response.json()


def test_submissions_are_throttled_per_user(api: APIClient, settings: object) -> None:
    settings.JOBS_SUBMIT_RATE = "2/min"

    codes = [api.post("/api/jobs/", ECHO, format="json").status_code for _ in range(3)]

    assert codes == [201, 201, 429]
    assert api.get("/api/jobs/").status_code == 200  # reads have their own budget


def test_a_finished_job_cannot_be_cancelled_and_a_queued_one_cannot_be_retried(api: APIClient, user: User) -> None:
    finished, queued = make_job(user, Job.Status.SUCCEEDED), make_job(user)

    assert api.post(f"/api/jobs/{finished.pk}/cancel/").status_code == 409
    response = api.post(f"/api/jobs/{queued.pk}/retry/")
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]


def test_cancelling_a_scheduled_job_records_it(api: APIClient) -> None:
    job_id = submit(api, **ECHO, run_at="2999-01-01T00:00:00Z")["id"]

    response = api.post(f"/api/jobs/{job_id}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    events = api.get(f"/api/jobs/{job_id}/events/").json()
    assert [e["type"] for e in events] == ["scheduled", "cancelled"]
    assert set(events[0]) == {"at", "type", "status", "message", "data"}


def test_the_openapi_schema_and_docs_are_served(api: APIClient) -> None:
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    assert "/api/jobs/batch/" in schema.json()["paths"]
    docs = api.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


def test_the_openapi_schema_is_valid_and_generates_without_warnings(tmp_path: Path) -> None:
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    schema = (tmp_path / "schema.yaml").read_text()
    for path in ("/api/uploads/", "/api/jobs/{id}/log/", "/api/jobs/{id}/stream/", "/api/jobs/{id}/artifacts/{name}"):
        assert f"{path}:" in schema


def test_the_written_out_job_representation_is_drfs_own(api: APIClient, user: User) -> None:
    parent = make_job(user, payload={"message": "p"})
    made = [
        parent,
        make_job(user, Job.Status.SUCCEEDED, payload={"message": 'é \\ "q"', "sleep_ms": 5}, priority="high",
                 result={"nested": [1, 2.5, None, {"a": "b"}]}),
        make_job(user, Job.Status.SCHEDULED, payload={"message": "later"}, run_at=timezone.now() + timedelta(hours=1),
                 idempotency_key="k-1", parent=parent, callback_url="http://127.0.0.1/cb"),
    ]  # fmt: skip

    jobs = list(Job.objects.select_related("owner").filter(pk__in=[job.pk for job in made]))
    assert len(jobs) == 3  # a comparison of nothing proves nothing
    for job in jobs:
        serializer = JobSerializer()
        assert serializer.to_representation(job) == serializer.to_representation_by_fields(job)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"kind": "nope", "payload": {}}, "kind", "the kinds are: ai_generate, build, echo, lint, message, test"),
        ({"kind": "echo", "payload": {"message": "m"}, "priorty": "high"}, "priorty", "Unknown field."),
        ({"kind": "echo", "payload": {"message": "m"}, "idempotency_key": "k" * 201}, "idempotency_key", "200"),
    ],
)
def test_bad_job_fields_are_a_400_naming_the_field_and_why(api: APIClient, body: dict, field: str, words: str) -> None:
    response = api.post("/api/jobs/", body, format="json")

    assert response.status_code == 400
    assert words in str(response.json()[field])
    assert Job.objects.count() == 0


def test_an_idempotency_key_header_over_its_limit_is_a_400_not_cut(api: APIClient) -> None:
    response = api.post(
        "/api/jobs/", {"kind": "echo", "payload": {"message": "m"}}, format="json", HTTP_IDEMPOTENCY_KEY="k" * 201
    )

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()
    assert Job.objects.count() == 0


def test_deeply_nested_json_is_a_400(api: APIClient) -> None:
    for depth in (100, 100_000):
        nested = "[" * depth + "]" * depth
        body = f'{{"kind": "echo", "payload": {{"message": "m", "x": {nested}}}}}'

        response = api.post("/api/jobs/", body, content_type="application/json")

        assert response.status_code == 400, depth
        assert "nested deeper than 64" in response.json()["detail"]


def test_a_batch_over_the_limit_is_refused_before_any_item_is_read(api: APIClient, settings: object) -> None:
    settings.JOBS_MAX_BATCH = 3
    invalid_items = [{"kind": "nope"}] * 4  # each would be an error of its own if it were read

    response = api.post("/api/jobs/batch/", {"jobs": invalid_items}, format="json")

    assert response.status_code == 400
    assert response.json() == {"jobs": ["At most 3 jobs per batch."]}


def test_an_echo_message_as_long_as_the_payload_limit_allows_is_accepted(api: APIClient) -> None:
    message = "x" * (1024 * 1024 - 100)

    response = api.post("/api/jobs/", {"kind": "echo", "payload": {"message": message}}, format="json")

    assert response.status_code == 201, response.content[:300]


def test_a_cancel_is_answered_once_committed_even_if_the_revoke_broadcast_fails(
    api: APIClient, user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import current_app

    job = make_job(user, Job.Status.RUNNING)

    def broker_away(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Error 111 connecting to the broker")

    monkeypatch.setattr(current_app.control, "revoke", broker_away)
    response = api.post(f"/api/jobs/{job.pk}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"


def endpoints_taking_an_offset() -> list[str]:
    """Every path whose GET declares an `offset` query parameter in the OpenAPI schema."""
    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    return sorted(
        path
        for path, operations in paths.items()
        if any(p["in"] == "query" and p["name"] == "offset" for p in operations.get("get", {}).get("parameters", []))
    )


# Committed, so that the event stream sees the token and the job from its own database threads; the job is
# scheduled, so nothing is published.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("offset", ["abc", "-1", "²"])
def test_every_endpoint_taking_an_offset_answers_a_bad_one_with_a_400_naming_it(
    api: APIClient, user: User, offset: str
) -> None:
    job = make_job(user, Job.Status.SCHEDULED)
    endpoints = endpoints_taking_an_offset()

    answers = {path: api.get(path.format(id=job.pk), {"offset": offset}) for path in endpoints}

    assert set(endpoints) >= {"/api/jobs/{id}/log/", "/api/jobs/{id}/stream/"}
    for path, response in answers.items():
        assert response.status_code == 400, path
        assert response.json() == {"offset": ["A non-negative integer is required."]}, path
