"""Job callbacks: a finished job's outcome is POSTed to its callback URL, through a real worker, to a
real HTTP server started by the test."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rest_framework.test import APIClient

from tests.conftest import WorkerProcess, wait_for
from tests.factories import submit


class Receiver(ThreadingHTTPServer):
    def __init__(self, fail_first: int) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.calls: list[tuple[int, dict, dict]] = []
        self.fail_first = fail_first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = 503 if len(self.server.calls) < self.server.fail_first else 204
        self.server.calls.append((code, payload, dict(self.headers)))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.django_db(transaction=True)
def test_a_finished_job_is_posted_to_its_callback_url_retrying_a_failing_receiver(
    worker: WorkerProcess, api: APIClient, receiver: Receiver
) -> None:
    job_id = submit(api, "echo", {"message": "ring", "fail_times": 0}, callback_url=receiver.url)["id"]

    wait_for(lambda: len(receiver.calls) == 2, timeout=30, what="the callback to be retried and delivered")

    codes = [code for code, _, _ in receiver.calls]
    assert codes == [503, 204]
    _, body, headers = receiver.calls[-1]
    assert body["id"] == job_id
    assert body["status"] == "succeeded"
    assert body["result"] == {"message": "ring"}
    assert headers["X-Conveyor-Job"] == job_id


@pytest.mark.django_db
def test_a_callback_to_a_host_not_allowed_is_refused(api: APIClient) -> None:
    url = "http://169.254.169.254/latest/meta-data"

    errors = submit(api, "echo", {"message": "x"}, callback_url=url, expect=400)

    assert "CALLBACK_ALLOWED_HOSTS" in errors["callback_url"][0]
