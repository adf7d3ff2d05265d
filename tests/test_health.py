import pytest
from rest_framework.test import APIClient

from tests.conftest import WorkerProcess


@pytest.mark.django_db(transaction=True)
def test_health_reports_database_broker_and_workers_without_auth(worker: WorkerProcess) -> None:
    response = APIClient().get("/api/health/")

    assert response.status_code == 200
    body = response.json()
    assert body["database"] == body["broker"] == "ok"
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
