"""Flower as Conveyor runs it: `python -m project.flower [flower options]`.

`celery -A project flower`, locked and with a memory:
- Credentials are required, from FLOWER_BASIC_AUTH (`user:password`, several separated by commas) or
  FLOWER_BASIC_AUTH_FILE (a file holding that value: a mounted secret). Without them Flower does not
  start, unless DEBUG is on: then credentials are generated once, into `flower-basic-auth` beside the
  state database, and the log says where. They never go on the command line, which `ps` shows.
- `/metrics` and `/healthcheck`, which Flower serves to anyone, ask for the same credentials; and
  Flower refuses to serve at all should its options end up without credentials (a `flowerconfig.py`
  can set them too).
- Its state (the workers and tasks it has seen) is kept in FLOWER_DB (default `.run/flower.db`), saved
  every minute and at exit, so a restart shows the history again.

Other options go to Flower as they are (`--port`, `--address`, ...), and so do the FLOWER_* variables
that Flower reads itself.
"""

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DB = BASE_DIR / ".run" / "flower.db"
# Flower saves its state at exit; a Flower that is killed instead loses at most this much history.
STATE_SAVE_INTERVAL_MS = 60_000
MISSING = (
    "no credentials: set FLOWER_BASIC_AUTH=user:password (or FLOWER_BASIC_AUTH_FILE, a file holding it); "
    "Flower does not serve without them"
)


class CredentialsError(Exception):
    pass


def configured_credentials(environ: Mapping[str, str]) -> str:
    """FLOWER_BASIC_AUTH, or what the file FLOWER_BASIC_AUTH_FILE names holds; "" when neither is set."""
    value = environ.get("FLOWER_BASIC_AUTH", "").strip()
    path = environ.get("FLOWER_BASIC_AUTH_FILE", "").strip()
    if value and path:
        raise CredentialsError("set FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"FLOWER_BASIC_AUTH_FILE: cannot read {path} ({exc.strerror})") from exc
        if not value:
            raise CredentialsError(f"FLOWER_BASIC_AUTH_FILE: {path} is empty")
    return value


def checked(credentials: str) -> str:
    """The credentials as Flower reads FLOWER_BASIC_AUTH (split at commas), each `user:password`."""
    entries = [entry.strip() for entry in credentials.split(",")]
    for entry in entries:
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            raise CredentialsError("FLOWER_BASIC_AUTH must be user:password[,user:password...], with neither empty")
    return ",".join(entries)


def generated_credentials(folder: Path) -> tuple[str, Path]:
    """DEBUG only: the credentials kept in `folder`, made on first use (readable by their owner alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flower-basic-auth"
    try:
        if existing := path.read_text().strip():
            return existing, path
    except FileNotFoundError:
        pass
    value = f"admin:{secrets.token_urlsafe(16)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")
    return value, path


def lock_down() -> None:
    """Make Flower ask for credentials on `/metrics` and `/healthcheck` as on its other pages, and refuse
    to serve with none configured, however its options were given."""
    from flower.app import Flower
    from flower.views import monitor
    from tornado import web

    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not hasattr(handler.get, "__wrapped__"):  # once, should this run twice in a process
            handler.get = web.authenticated(handler.get)

    serve = Flower.start_http_server
    if getattr(serve, "locked", False):
        return

    def start_http_server(self: Flower) -> int | None:
        try:
            checked(",".join(self.options.basic_auth or []))
        except CredentialsError:
            sys.exit(f"flower: {MISSING}")
        return serve(self)

    start_http_server.locked = True
    Flower.start_http_server = start_http_server


def main(argv: list[str]) -> None:
    if any(arg.lstrip("-").replace("-", "_").startswith("basic_auth") for arg in argv):
        sys.exit("flower: give credentials in FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE, not on the command line")

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.conf import settings

    debug = settings.DEBUG  # reading the settings also reads `.env`, which may hold FLOWER_BASIC_AUTH
    db = Path(os.environ.get("FLOWER_DB") or DEFAULT_DB).absolute()
    try:
        credentials = configured_credentials(os.environ)
        if not credentials:
            if not debug:
                raise CredentialsError(f"{MISSING} (outside DEBUG)")
            credentials, path = generated_credentials(db.parent)
            print(f"flower: DEBUG, no FLOWER_BASIC_AUTH: the credentials are in {path}", file=sys.stderr, flush=True)
        credentials = checked(credentials)
    except CredentialsError as exc:
        sys.exit(f"flower: {exc}")
    os.environ["FLOWER_BASIC_AUTH"] = credentials  # Flower reads its FLOWER_* options from the environment
    db.parent.mkdir(parents=True, exist_ok=True)

    lock_down()
    from celery.bin.celery import celery
    from celery.bin.celery import main as celery_main
    from flower.command import flower

    celery.add_command(flower)
    # Ours first: options given on the command line come later and win.
    defaults = ["--persistent=True", f"--db={db}", f"--state_save_interval={STATE_SAVE_INTERVAL_MS}"]
    sys.argv = ["celery", "-A", "project", "flower", *defaults, *argv]
    sys.exit(celery_main())


if __name__ == "__main__":
    main(sys.argv[1:])
