import pytest
from rest_framework.test import APIClient

from tests.conftest import WorkerProcess, client_for
from tests.factories import make_user


@pytest.mark.django_db(transaction=True)
def test_health_reports_database_broker_and_workers_without_auth_but_names_no_host(worker: WorkerProcess) -> None:
    response = APIClient().get("/api/health/")

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["database"] == body["broker"] == body["sandbox"] == "ok"
    assert body["workers"] >= 1
    assert "@" not in response.content.decode()  # no worker's host name


@pytest.mark.django_db(transaction=True)
def test_staff_see_which_workers_answered(worker: WorkerProcess) -> None:
    staff = client_for(make_user("operator", staff=True))

    body = staff.get("/api/health/").json()

    assert any(name.startswith("test-") for name in body["workers"])


@pytest.mark.django_db
def test_health_is_503_when_the_broker_is_down(settings: object) -> None:
    from celery import current_app

    current_app.conf.broker_url = "redis://127.0.0.1:1/0"
    try:
        response = APIClient().get("/api/health/")
    finally:
        current_app.conf.broker_url = settings.CELERY_BROKER_URL

    assert response.status_code == 503
    assert response.json()["broker"].startswith("error")
