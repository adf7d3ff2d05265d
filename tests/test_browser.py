"""The live pages in a real browser: headless Chromium (Debian's chromium and chromium-driver, never a
downloaded one) through Selenium, against the web process as deployed (ASGI) and a real worker.

The browser logs in with a session cookie made here, and every wait is on what the page shows. Each
test marks its page (`window.__marker`) once loaded: a page that reloaded would have lost it.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from apps.jobs import lifecycle
from apps.jobs.models import Job
from tests.conftest import Web, WorkerProcess, client_for, require_bwrap
from tests.factories import make_job, make_user, submit
from tests.fake_llm import FakeLLM

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# What the live view shows (templates/jobs/_live.html), read in the page.
SHOWN = """
const live = document.querySelector("[data-job-live]");
const part = (name) => live.querySelector(`[data-live="${name}"]`);
const log = part("log");
return {
  status: part("status").textContent,
  progress: part("progress").value,
  percent: part("percent").textContent,
  log: log.textContent,
  log_elements: log.querySelectorAll("*").length,
  text: part("text")?.textContent ?? null,
  text_elements: part("text")?.querySelectorAll("*").length ?? null,
  timeline: [...part("timeline").rows].map((row) => [...row.cells].map((cell) => cell.textContent)),
  admin_status: document.querySelector(".form-row.field-status .readonly")?.textContent ?? null,
  marker: window.__marker ?? null,
  pwned: window.__pwned ?? null,
};
"""

# The admin list's row of one job: its status and progress cells.
ROW = """
const box = [...document.querySelectorAll("#result_list input.action-select")].find((b) => b.value === arguments[0]);
const row = box.closest("tr");
return {
  status: row.querySelector("td.field-status").textContent,
  progress: row.querySelector("td.field-progress_bar").textContent.trim(),
  marker: window.__marker ?? null,
};
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(
            f"the browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing): "
            "apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path below: Selenium Manager downloads nothing
    # --no-sandbox: Chromium's own sandbox needs user namespaces, which CI containers (as root) lack.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-proxy-server", "--window-size=1280,1024"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def web(process_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    server = Web(process_env, tmp_path_factory.mktemp("web"))
    yield server
    server.stop()


class Site:
    """The web process, as the browser sees it."""

    def __init__(self, browser: WebDriver, web: Web) -> None:
        self.browser = browser
        self.origin = f"http://127.0.0.1:{web.port}"

    def log_in(self, user: User) -> None:
        """`user`'s session, made here and handed to the browser as its cookie."""
        client = Client()
        client.force_login(user)
        self.browser.get(f"{self.origin}/static/jobs/live.css")  # a page of the origin, to set its cookie on
        self.browser.delete_all_cookies()
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        self.browser.add_cookie({"name": settings.SESSION_COOKIE_NAME, "value": cookie.value})

    def open(self, path: str) -> None:
        """Load `path`, then mark the page (a reload would lose the mark)."""
        self.browser.get(f"{self.origin}{path}")
        self.browser.execute_script("window.__marker = 1")

    def read(self, script: str, *args: object) -> dict:
        return self.browser.execute_script(script, *args)

    def watch(self, script: str, until: Callable[[dict], bool], *args: object, timeout: float = 30) -> list[dict]:
        """What `script` reads in the page, each time it looked (every 50 ms), until `until` holds."""
        seen: list[dict] = []

        def look(driver: WebDriver) -> bool:
            seen.append(driver.execute_script(script, *args))
            return until(seen[-1])

        try:
            WebDriverWait(self.browser, timeout, poll_frequency=0.05).until(look)
        except TimeoutException:
            raise AssertionError(f"the page did not get there in {timeout}s; it last showed {seen[-1:]}") from None
        return seen


@pytest.fixture
def site(browser: WebDriver, web: Web) -> Iterator[Site]:
    yield Site(browser, web)
    browser.get("about:blank")  # closes the page's event stream


@pytest.mark.browser
def test_the_admin_job_page_follows_a_running_echo_job_to_success_without_reloading(
    site: Site, worker: WorkerProcess
) -> None:
    staff = make_user("root", superuser=True)
    site.log_in(staff)
    job = submit(client_for(staff), "echo", {"message": "hi", "sleep_ms": 3000, "progress_steps": 6})

    site.open(f"/admin/jobs/job/{job['id']}/change/")
    first = site.read(SHOWN)
    seen = site.watch(SHOWN, lambda s: s["status"] == "succeeded" and s["timeline"][-1][2] == "succeeded")

    assert first["status"] in ("queued", "running")
    assert first["progress"] < 100
    assert any(0 < s["progress"] < 100 for s in seen), "no progress was shown between 0 and 100%"
    last = seen[-1]
    assert last["progress"] == 100
    assert last["percent"] == "100%"
    assert last["admin_status"] == "Succeeded"  # the admin's own status field followed too
    assert [row[2] for row in last["timeline"]] == ["queued", "running", "succeeded"]
    assert last["marker"] == 1  # the same page all along


SCRIPT = """\
import time
time.sleep(1)
print("<img src=x onerror=window.__pwned=1>", flush=True)
for i in range(5):
    print(f"line {i}", flush=True)
    time.sleep(0.3)
"""


@pytest.mark.browser
def test_a_build_jobs_log_lines_appear_in_order_on_its_owners_page(
    site: Site, worker: WorkerProcess, user: User, api: APIClient
) -> None:
    require_bwrap()
    site.log_in(user)
    job = submit(api, "build", {"source": {"files": {"lines.py": SCRIPT}}, "command": ["python", "lines.py"]})

    site.open(f"/jobs/{job['id']}/")
    seen = site.watch(SHOWN, lambda s: s["status"] == "succeeded", timeout=60)

    log = seen[-1]["log"]
    assert [log.index(f"line {i}") for i in range(5)] == sorted(log.index(f"line {i}") for i in range(5))
    # Line by line while the job ran, not all at once at its end.
    assert any(s["status"] == "running" and "line 0" in s["log"] and "line 4" not in s["log"] for s in seen)
    # What the job printed is text on the page, never markup.
    assert "<img src=x onerror=window.__pwned=1>" in log
    assert seen[-1]["log_elements"] == 0
    assert seen[-1]["pwned"] is None
    assert seen[-1]["marker"] == 1


@pytest.mark.browser
def test_an_ai_jobs_text_grows_as_it_is_generated_on_its_owners_page(
    site: Site, worker: WorkerProcess, user: User, api: APIClient, llm: FakeLLM
) -> None:
    tokens = ["<script>window.__pwned=1</script> ", *(f"word{i} " for i in range(30))]
    llm.reset(tokens=tokens, token_delay=0.1)
    site.log_in(user)
    job = submit(api, "ai_generate", {"prompt": "write slowly"}, shortcut=True)

    site.open(f"/jobs/{job['id']}/")
    seen = site.watch(SHOWN, lambda s: s["status"] == "succeeded")

    assert any(s["status"] == "running" and "word0" in s["text"] and "word29" not in s["text"] for s in seen)
    last = seen[-1]
    assert last["text"] == "".join(tokens)  # as text: the markup shown, not run
    assert (last["text_elements"], last["pwned"], last["marker"]) == (0, None, 1)


@pytest.mark.browser
def test_the_admin_job_list_shows_status_and_progress_changes_without_reloading(site: Site, user: User) -> None:
    staff = make_user("root", superuser=True)
    job = make_job(user, Job.Status.RUNNING)  # its attempt driven by the test (no worker runs it)
    site.log_in(staff)

    site.open("/admin/jobs/job/")
    first = site.read(ROW, str(job.pk))
    lifecycle.set_progress(job, 60, "halfway")
    halfway = site.watch(ROW, lambda s: s["progress"] == "60%", str(job.pk))[-1]
    lifecycle.succeed(job, {"message": "m"})
    done = site.watch(ROW, lambda s: s["status"] == "Succeeded", str(job.pk))[-1]

    assert (first["status"], first["progress"]) == ("Running", "0%")
    assert halfway["status"] == "Running"
    assert (done["progress"], done["marker"]) == ("100%", 1)


# --- the owner's page and the list's statuses, without a browser ----------------------------------


def test_an_anonymous_visitor_of_a_job_page_is_sent_to_log_in(user: User) -> None:
    job = make_job(user)
    client = Client()

    response = client.get(f"/jobs/{job.pk}/")

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next=/jobs/{job.pk}/"
    login = client.post(response["Location"], {"username": "alice", "password": "pw-alice"})
    assert (login.status_code, login["Location"]) == (302, f"/jobs/{job.pk}/")
    assert client.get(f"/jobs/{job.pk}/").status_code == 200


def test_a_job_page_shows_its_owner_the_job_and_is_a_404_for_anyone_else(user: User, other_user: User) -> None:
    job = make_job(user, Job.Status.RUNNING)
    lifecycle.set_progress(job, 30, "<b>compiling</b>")
    owner, stranger, staff = Client(), Client(), Client()
    owner.force_login(user)
    stranger.force_login(other_user)
    staff.force_login(make_user("root", staff=True))

    response = owner.get(f"/jobs/{job.pk}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-stream-url="/api/jobs/{job.pk}/stream/"' in html
    assert '<progress data-live="progress" max="100" value="30">' in html
    assert "&lt;b&gt;compiling&lt;/b&gt;" in html  # escaped, as everything a job wrote
    assert "/static/jobs/live.js" in html
    assert stranger.get(f"/jobs/{job.pk}/").status_code == 404
    assert staff.get(f"/jobs/{job.pk}/").status_code == 200


def test_the_list_statuses_answer_staff_only_from_one_query(user: User) -> None:
    running, cancelled = make_job(user, Job.Status.RUNNING), make_job(user, Job.Status.CANCELLED)
    lifecycle.set_progress(running, 25, "a quarter")
    staff, owner = Client(), Client()
    staff.force_login(make_user("root", staff=True))
    owner.force_login(user)
    ids = f"{running.pk},{cancelled.pk}"

    with CaptureQueriesContext(connection) as queries:
        response = staff.get("/jobs/statuses/", {"ids": ids})

    assert response.status_code == 200
    jobs = {job["id"]: job for job in response.json()["jobs"]}
    assert jobs[str(running.pk)] == {"id": str(running.pk), "status": "running", "status_display": "Running",
                                     "progress": 25, "progress_message": "a quarter"}  # fmt: skip
    assert (jobs[str(cancelled.pk)]["status"], jobs[str(cancelled.pk)]["status_display"]) == ("cancelled", "Cancelled")
    assert len([q for q in queries.captured_queries if 'FROM "jobs_job"' in q["sql"]]) == 1
    assert owner.get("/jobs/statuses/", {"ids": ids}).status_code == 403
    assert Client().get("/jobs/statuses/", {"ids": ids}).status_code == 403
    assert staff.get("/jobs/statuses/", {"ids": "not-an-id"}).status_code == 400
