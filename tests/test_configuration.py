"""Configuration for production: secrets from files (`NAME_FILE`), `check --deploy` clean under the
production settings, HTTPS without breaking the orchestrator's probes."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent

CONFIGMAP = ROOT / "deploy" / "k8s" / "configmap.yaml"


def production_env(folder: Path) -> dict[str, str]:
    """The settings the Kubernetes manifests give every pod (deploy/k8s/configmap.yaml), with each
    secret file they name written under `folder` (as the mounted Secret would hold it)."""
    data = yaml.safe_load(CONFIGMAP.read_text())["data"]
    samples = {
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": "postgres://conveyor:pw@db.internal:5432/conveyor",
        "REDIS_URL": "redis://redis.internal:6379/0",
        "CREDENTIALS_KEYS": "Z-Y9W4NcFlMODUZo5cs1ie-guWMgD64qdtXR2LBZym8=",
        "FLOWER_BASIC_AUTH": "admin:" + secrets.token_urlsafe(12),
    }
    env = {}
    for name, value in data.items():
        if name.endswith("_FILE"):
            secret = name.removesuffix("_FILE")
            (folder / secret).write_text(samples.get(secret, f"sample-{secret.lower()}") + "\n")
            value = str(folder / secret)
        env[name] = str(value)
    return env


def settings_in_child(env: dict[str, str], *names: str) -> subprocess.CompletedProcess:
    """Load the real settings (not the tests') in a fresh process with `env`; print `names` as JSON."""
    code = (
        "import json, django; from django.conf import settings; django.setup(); "
        f"print(json.dumps({{n: str(getattr(settings, n)) for n in {list(names)!r}}}))"
    )
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_FILE") and k not in ("SECRET_KEY", "DEBUG") and f"{k}_FILE" not in env
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "project.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_secret_can_come_from_a_file(tmp_path: Path) -> None:
    key, token = "k" * 50, "sk-from-a-mounted-secret-0123456789"
    (tmp_path / "secret_key").write_text(key + "\n")  # as `echo ... > file` writes it
    (tmp_path / "openai").write_text(token)
    (tmp_path / "database_url").write_text("postgres://app:pw@db.internal:5432/conveyor\n")
    env = {
        "SECRET_KEY_FILE": str(tmp_path / "secret_key"),
        "OPENAI_API_KEY_FILE": str(tmp_path / "openai"),
        "DATABASE_URL_FILE": str(tmp_path / "database_url"),
        "DEBUG": "false",
    }
    loaded = settings_in_child(env, "SECRET_KEY", "OPENAI_API_KEY", "DATABASES")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    values = json.loads(loaded.stdout)
    assert values["SECRET_KEY"] == key
    assert values["OPENAI_API_KEY"] == token
    assert "'HOST': 'db.internal'" in values["DATABASES"]


def test_a_secret_set_twice_or_unreadable_is_refused_by_name_without_its_value(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(40)
    (tmp_path / "secret_key").write_text(secret)
    both = settings_in_child({"SECRET_KEY": secret, "SECRET_KEY_FILE": str(tmp_path / "secret_key")}, "DEBUG")
    assert both.returncode != 0
    assert "set SECRET_KEY or SECRET_KEY_FILE, not both" in both.stderr
    missing = settings_in_child({"SECRET_KEY_FILE": str(tmp_path / "absent")}, "DEBUG")
    assert missing.returncode != 0
    assert "SECRET_KEY_FILE: cannot read" in missing.stderr
    assert secret not in both.stderr + missing.stderr


def test_check_deploy_is_clean_under_the_production_settings(tmp_path: Path) -> None:
    """The settings the Kubernetes manifests use, their secrets read from files, pass Django's
    deployment checks with no warning."""
    production = production_env(tmp_path)
    assert production["DEBUG"] == "false"
    assert production["HTTPS_ONLY"] == "true"
    env = {k: v for k, v in os.environ.items() if k.removesuffix("_FILE") not in {*production, "SECRET_KEY", "DEBUG"}}
    env = {k: v for k, v in env.items() if f"{k}_FILE" not in production}
    env.update(production, DJANGO_SETTINGS_MODULE="project.settings")
    checked = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout


@pytest.mark.django_db
def test_https_only_redirects_plain_http_but_not_the_probes(settings) -> None:
    settings.SECURE_SSL_REDIRECT = True
    client = Client()
    assert client.get("/api/jobs/").status_code == 301
    assert client.get("/api/health/").status_code in (200, 503)  # answered, not redirected
    assert client.get("/metrics").status_code in (401, 403)
    assert client.get("/api/jobs/", secure=True).status_code == 401


def test_a_secret_starting_with_a_dollar_is_itself_and_a_bad_database_url_is_not_quoted(tmp_path: Path) -> None:
    key = "$" + secrets.token_urlsafe(50)  # a generated password may start so: not another variable's name
    (tmp_path / "secret_key").write_text(key)
    loaded = settings_in_child({"SECRET_KEY_FILE": str(tmp_path / "secret_key"), "DEBUG": "false"}, "SECRET_KEY")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert json.loads(loaded.stdout)["SECRET_KEY"] == key

    bad = settings_in_child({"DATABASE_URL": "postgres://app:s3cr#t/Pw@db:5432/conveyor", "DEBUG": "true"}, "DEBUG")
    assert bad.returncode != 0
    assert "DATABASE_URL is empty or not a valid URL" in bad.stderr
    assert "s3cr" not in bad.stderr
