"""Conveyor settings: one module, configured by the environment (and an optional `.env` file).

Every value that differs between a laptop, CI and production is read here through django-environ's
typed readers, which raise on a malformed value instead of guessing.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

BASE_DIR = Path(__file__).resolve().parent.parent


class SecretFiles(environ.FileAwareMapping):
    """The environment, where any `NAME` may come from a file named by `NAME_FILE` (a Docker or
    Kubernetes secret mounted as a file): its content without the final line break. Setting both is
    an error, as is a file that cannot be read (said with the variable's name, never the content)."""

    def __getitem__(self, key: str) -> str:
        path = self.env.get(f"{key}_FILE")
        if not path:
            return self.env[key]
        if key in self.env:
            raise ImproperlyConfigured(f"set {key} or {key}_FILE, not both")
        try:
            return super().__getitem__(key).rstrip("\r\n")
        except OSError as exc:
            raise ImproperlyConfigured(f"{key}_FILE: cannot read {path} ({exc.strerror})") from None


class Env(environ.Env):
    """django-environ's reader, on `SecretFiles`, without its proxies: a value starting with `$` (a
    generated password may) is that value, not the name of another variable."""

    ENVIRON = SecretFiles()

    def get_value(
        self, var_name: str, cast: object = None, default: object = environ.Env.NOTSET, parse_default: bool = False
    ) -> object:
        try:
            raw = self.ENVIRON[var_name]
        except KeyError:
            return super().get_value(var_name, cast=cast, default=default, parse_default=parse_default)
        if not (isinstance(raw, str) and raw.startswith("$")):
            return super().get_value(var_name, cast=cast, default=default, parse_default=parse_default)
        return self.parse_value(raw, cast) if cast is not None else raw


env = Env()
if (BASE_DIR / ".env").is_file():
    env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key"  # noqa: S105 (DEBUG only)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "apps.jobs",
    "apps.credentials",
    "apps.messaging",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "project.middleware.StaticFiles",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "apps.jobs.api.waits.wait_for_jobs",  # `?wait=N` on a job: after the view, without a thread
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- Database -------------------------------------------------------------------------------
# PostgreSQL, from a laptop (`make run` starts a private one when none answers) to production: the
# hot path's statements (RETURNING, COPY, the database's clock for leases) are PostgreSQL's.
try:
    DATABASES = {"default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/conveyor")}
except (ValueError, KeyError):  # the parser's message may quote part of the password: not repeated
    raise ImproperlyConfigured(
        "DATABASE_URL is empty or not a valid URL (percent-encode characters such as # / @ in the password)"
    ) from None
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL must name a PostgreSQL database (postgres://...)")
# A connection whose peer went silent (a partition, a host gone) fails within seconds instead of
# hanging on TCP's retransmissions for minutes: so a worker cut off from the database notices, and
# stops its jobs before their leases run out (tasks/leases.py). Keepalives find idle ones.
DATABASES["default"]["OPTIONS"] = {
    "connect_timeout": env.int("DB_CONNECT_TIMEOUT_SECONDS", default=5),
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": int(env.float("DB_TCP_USER_TIMEOUT_SECONDS", default=10.0) * 1000),
}
if DB_POOL_SIZE := env.int("DB_POOL_SIZE", default=0):
    # A connection pool per process (psycopg's): what the ASGI web process uses, where requests run
    # in threads of their own and a persistent connection per thread would pile up (the Procfile
    # sets it for web). Django's persistent connections must be off with it.
    # A request waits at most DB_POOL_TIMEOUT seconds for a connection: with the database down, the
    # API answers 503 that soon.
    timeout = env.float("DB_POOL_TIMEOUT", default=3.0)
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 1, "max_size": DB_POOL_SIZE, "timeout": timeout}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    # No ping before each reuse (a round trip per request and per job): a connection that died with
    # a database restart fails once and is then replaced; workers retry their claim on a new one.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DB_CONN_HEALTH_CHECKS", default=False)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Celery -----------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
    }
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
BROKER_IS_REDIS = CELERY_BROKER_URL.startswith(("redis://", "rediss://", "unix://", "sentinel://", "redis+socket://"))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# The Job row holds status and result; Celery keeps none.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
# A message is acknowledged only once its job has run, one message is reserved per pool process
# (so a critical job is not stuck behind prefetched normal ones), and a message whose pool process
# died is put back on the queue instead of being dropped.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A broker blip must not restart running jobs: the row is the truth and claims are fenced, so a job
# keeps running and its message is settled once the connection is back (or redelivered, and refused).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Task events cost three broker messages per task. Off unless asked: Flower turns them on in the
# workers it watches (its `enable_events`, on by default), so they flow only while someone looks.
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# On a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT in the environment, as a deploy
# should send it), running jobs get this long to finish, then are handed back to their queue without
# their attempt counting (see JOBS_MAX_HANDBACKS). 0: a cold shutdown hands them back at once.
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=0.0)
# Celery's Django fixup closes the database connection around every task unless this is set (a new
# PostgreSQL connection per job, ~10x the cost of the job's own queries). With it, the connection is
# kept; each job starts with Django's close_old_connections(), which honours CONN_MAX_AGE as a web
# request does.
CELERY_DB_REUSE_MAX = 100_000
CELERY_TASK_DEFAULT_QUEUE = "default"

JOBS_QUEUES = ("builds", "ai", "messages", "default")
JOBS_MAX_TIMEOUT_SECONDS = env.int("JOBS_MAX_TIMEOUT_SECONDS", default=3600)
if BROKER_IS_REDIS:
    # Redis emulates priorities with one list per step; 0 is served first.
    # The visibility timeout is deliberately longer than the longest job (plus its retry delay):
    # Redis would otherwise hand a still-running job's message to a second worker. Lost workers
    # are detected sooner and independently, by the reconciler, through job heartbeats.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # An unreachable broker costs a submission two seconds, not a hung request (the job's row
        # is written either way, and the reconciler publishes it once the broker answers).
        "socket_connect_timeout": 2,
        "max_retries": 1,
        "priority_steps": [0, 3, 6, 9],
        "sep": ":",
        "queue_order_strategy": "priority",
        "visibility_timeout": env.int("BROKER_VISIBILITY_TIMEOUT", default=JOBS_MAX_TIMEOUT_SECONDS + 3600),
    }
    CELERY_TASK_QUEUES = [Queue(name, Exchange(name), routing_key=name) for name in JOBS_QUEUES]
else:
    # RabbitMQ: classic queues, whose x-max-priority gives the four priorities (a quorum queue has two
    # priority levels before RabbitMQ 4.3). Publisher confirms: a submission returns once the broker
    # has the message. The server's `consumer_timeout` (30 min by default) must exceed the longest
    # retry delay plus the longest job plus its hard grace: a late-acked message held longer closes
    # the worker's channel (README: Redis or RabbitMQ as the broker).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True, "connect_timeout": 2, "max_retries": 1}
    CELERY_TASK_QUEUES = [
        Queue(
            name,
            Exchange(name),
            routing_key=name,
            queue_arguments={"x-max-priority": 9, "x-queue-type": "classic"},
        )
        for name in JOBS_QUEUES
    ]

# --- Job platform -----------------------------------------------------------------------------
# A running job writes a heartbeat every JOBS_HEARTBEAT_SECONDS; one silent for JOBS_LEASE_SECONDS
# has lost its worker and is run again (or dead-lettered when out of attempts).
JOBS_HEARTBEAT_SECONDS = env.float("JOBS_HEARTBEAT_SECONDS", default=5.0)
JOBS_LEASE_SECONDS = env.float("JOBS_LEASE_SECONDS", default=30.0)
# A queued job not claimed this long after it was queued is published again if its message is gone.
JOBS_REDISPATCH_GRACE_SECONDS = env.float("JOBS_REDISPATCH_GRACE_SECONDS", default=30.0)
JOBS_RECONCILE_INTERVAL_SECONDS = env.float("JOBS_RECONCILE_INTERVAL_SECONDS", default=5.0)
JOBS_RETRY_BASE_SECONDS = env.float("JOBS_RETRY_BASE_SECONDS", default=2.0)
JOBS_RETRY_MAX_SECONDS = env.float("JOBS_RETRY_MAX_SECONDS", default=600.0)
# Times a running job may be handed back by a worker shutting down (a deploy) without the attempt
# counting; beyond that, a hand-back counts as an attempt.
JOBS_MAX_HANDBACKS = env.int("JOBS_MAX_HANDBACKS", default=3)
# The statistics' roll-up (apps/jobs/stats.py) keeps per-minute counts this many days, hourly timing
# histograms this many.
JOBS_STATS_MINUTES_DAYS = env.int("JOBS_STATS_MINUTES_DAYS", default=2)
JOBS_STATS_HOURS_DAYS = env.int("JOBS_STATS_HOURS_DAYS", default=30)
# /metrics: a bearer token, or basic auth "user:password" (or a staff user's API token).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_BASIC_AUTH = env.str("METRICS_BASIC_AUTH", default="")
# Retention (apps/jobs/retention.py; days, 0 keeps for ever): finished jobs with their timeline, log and
# artifacts; per kind ("ai_generate=7,build=14"); dead letters (kept longer: they wait for a replay);
# uploads no unfinished job needs. Pruned by beat every JOBS_PRUNE_INTERVAL_SECONDS, in batches.
JOBS_RETENTION_DAYS = env.int("JOBS_RETENTION_DAYS", default=30)
JOBS_RETENTION_BY_KIND = {kind: int(days) for kind, days in env.dict("JOBS_RETENTION_BY_KIND", default={}).items()}
JOBS_RETENTION_DEAD_LETTER_DAYS = env.int("JOBS_RETENTION_DEAD_LETTER_DAYS", default=90)
UPLOAD_RETENTION_DAYS = env.int("UPLOAD_RETENTION_DAYS", default=30)
JOBS_PRUNE_INTERVAL_SECONDS = env.float("JOBS_PRUNE_INTERVAL_SECONDS", default=300.0)
JOBS_PRUNE_BATCH = env.int("JOBS_PRUNE_BATCH", default=1000)
JOBS_PRUNE_STATEMENT_TIMEOUT_MS = env.int("JOBS_PRUNE_STATEMENT_TIMEOUT_MS", default=5000)
JOBS_PRUNE_MAX_SECONDS = env.float("JOBS_PRUNE_MAX_SECONDS", default=0.5)  # per run: beat's tick is shared
# How many times a job may be put off by a 429 or a shared rate limit before that counts as an attempt.
JOBS_MAX_DEFERRALS = env.int("JOBS_MAX_DEFERRALS", default=100)
JOBS_PROGRESS_MIN_INTERVAL_SECONDS = env.float("JOBS_PROGRESS_MIN_INTERVAL_SECONDS", default=0.5)
# Seconds between the soft time limit (the job is told and marked timed_out) and the hard kill.
JOBS_HARD_TIMEOUT_GRACE_SECONDS = env.int("JOBS_HARD_TIMEOUT_GRACE_SECONDS", default=10)
JOBS_MAX_PAYLOAD_BYTES = env.int("JOBS_MAX_PAYLOAD_BYTES", default=1024 * 1024)
JOBS_MAX_REQUEST_BYTES = env.int("JOBS_MAX_REQUEST_BYTES", default=32 * 1024 * 1024)
JOBS_MAX_BATCH = env.int("JOBS_MAX_BATCH", default=10_000)
JOBS_SUBMIT_RATE = env.str("JOBS_SUBMIT_RATE", default="600/min")
# Who may jump the queue is a policy: on, `high` and `critical` need the jobs.submit_critical permission.
JOBS_RESTRICT_PRIORITY = env.bool("JOBS_RESTRICT_PRIORITY", default=False)


def _per_queue(name: str, text: str) -> dict[str, int]:
    """A cap per queue from `text`: "4" (every queue), "builds=2,ai=8", or "4,builds=1" (which gives
    {"*": 4, "builds": 1}); 0 is no cap."""
    caps: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        queue, _, number = item.rpartition("=")
        queue = queue.strip() or "*"
        if queue != "*" and queue not in JOBS_QUEUES:
            raise ImproperlyConfigured(f"{name}: {queue!r} is not a queue ({', '.join(JOBS_QUEUES)})")
        try:
            caps[queue] = int(number)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} is not a number of jobs") from None
        if caps[queue] < 0:
            raise ImproperlyConfigured(f"{name}: {item!r} is below 0")
    return caps


# At most this many running jobs per user in a queue (a backlog waits its turn, held back from the
# broker, so another user's job goes first); "4", "builds=2,ai=8" or "4,builds=1". Empty or 0: no cap.
JOBS_USER_CONCURRENCY = _per_queue("JOBS_USER_CONCURRENCY", env.str("JOBS_USER_CONCURRENCY", default=""))
JOBS_READ_RATE = env.str("JOBS_READ_RATE", default="6000/min")
# Server-Sent Events streams a user may hold open at once, over every web process.
JOBS_MAX_STREAMS_PER_USER = env.int("JOBS_MAX_STREAMS_PER_USER", default=20)
# `?wait=` on submitting or reading a job holds the request at most this long (a wait is a stream).
JOBS_MAX_WAIT_SECONDS = env.float("JOBS_MAX_WAIT_SECONDS", default=30.0)
# Hosts (exact names, as written in the URL) that job callbacks may call even when they resolve to
# private, loopback, link-local or other non-public addresses. Public hosts need no listing; no wildcard.
CALLBACK_ALLOWED_HOSTS = env.list("CALLBACK_ALLOWED_HOSTS", default=[])
CALLBACK_TIMEOUT_SECONDS = env.float("CALLBACK_TIMEOUT_SECONDS", default=10.0)

# --- Build, test and lint jobs ---------------------------------------------------------------
# How job commands are confined: "bwrap" (bubblewrap: own PID, network, IPC and UTS namespaces,
# read-only system, only the work directory writable), "rlimit" (unconfined: a process group with
# resource limits, sharing the worker's file system and network; only when asked for by name), or
# "auto" (bwrap; without a working bwrap, tool jobs fail instead of running unconfined).
JOB_SANDBOX = env.str("JOB_SANDBOX", default="auto")
if JOB_SANDBOX not in ("auto", "bwrap", "rlimit"):
    raise ImproperlyConfigured("JOB_SANDBOX must be auto, bwrap or rlimit")
# The virtualenv whose python, pytest, ruff and build the jobs run (`make` creates it).
JOB_TOOLCHAIN = Path(env.str("JOB_TOOLCHAIN", default=str(BASE_DIR / ".toolchain")))
# Where work directories (and their disk images) are made; "" for the system's temp directory.
JOB_WORK_ROOT = env.str("JOB_WORK_ROOT", default="") or None
# Programs a job's custom `command` may start (by bare name, looked up on the sandbox's PATH).
JOB_COMMAND_ALLOWLIST = env.list("JOB_COMMAND_ALLOWLIST", default=["python", "pytest", "ruff", "make"])
# URL schemes a git source may use: https, and "file" to read repositories on the worker's own disk.
JOB_GIT_SCHEMES = env.list("JOB_GIT_SCHEMES", default=["https"])
if set(JOB_GIT_SCHEMES) - {"https", "file"}:
    raise ImproperlyConfigured("JOB_GIT_SCHEMES may hold https and file only")
# Git hosts that may resolve to loopback, private, link-local or multicast addresses (exact names).
JOB_GIT_ALLOWED_HOSTS = [host.lower() for host in env.list("JOB_GIT_ALLOWED_HOSTS", default=[])]
# Ports a git host not named in JOB_GIT_ALLOWED_HOSTS may be reached on.
JOB_GIT_PORTS = env.list("JOB_GIT_PORTS", cast=int, default=[443])
# Folders file:// repositories may be cloned from (when JOB_GIT_SCHEMES has "file").
JOB_GIT_FILE_ROOTS = env.list("JOB_GIT_FILE_ROOTS", default=[])
JOB_GIT_TIMEOUT_SECONDS = env.int("JOB_GIT_TIMEOUT_SECONDS", default=300)
JOB_GIT_MAX_BYTES = env.int("JOB_GIT_MAX_BYTES", default=200 * 1024 * 1024)  # received from the git host
JOB_GIT_CA_FILE = env.str("JOB_GIT_CA_FILE", default="")  # extra CA certificates (a self-hosted git server)
JOB_SOURCE_MAX_FILES = env.int("JOB_SOURCE_MAX_FILES", default=10_000)
JOB_SOURCE_MAX_BYTES = env.int("JOB_SOURCE_MAX_BYTES", default=200 * 1024 * 1024)  # unpacked
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=50 * 1024 * 1024)
JOB_LOG_MAX_BYTES = env.int("JOB_LOG_MAX_BYTES", default=1024 * 1024)
JOB_ARTIFACTS_MAX_FILES = env.int("JOB_ARTIFACTS_MAX_FILES", default=100)
JOB_ARTIFACTS_MAX_BYTES = env.int("JOB_ARTIFACTS_MAX_BYTES", default=200 * 1024 * 1024)
# Limits of one job, whatever it starts (see the README's sandbox section for how each is enforced).
JOB_MEMORY_BYTES = env.int("JOB_MEMORY_BYTES", default=4 * 1024**3)
JOB_MAX_PROCESSES = env.int("JOB_MAX_PROCESSES", default=256)
JOB_DISK_BYTES = env.int("JOB_DISK_BYTES", default=4 * 1024**3)  # the work directory, /tmp included
JOB_MAX_FILES = env.int("JOB_MAX_FILES", default=200_000)  # files and directories in the work directory
JOB_FILE_BYTES = env.int("JOB_FILE_BYTES", default=1024**3)  # any one file
# A worker running as root runs each job as a user of its own: uid JOB_UID_BASE + the job's slot,
# one slot per job running on the host at once (at most JOB_SLOTS).
JOB_UID_BASE = env.int("JOB_UID_BASE", default=200_000)
JOB_SLOTS = env.int("JOB_SLOTS", default=64)
# Where job cgroups are made on a cgroup v2 host ("" to find it: a "conveyor" group at the root).
JOB_CGROUP_ROOT = env.str("JOB_CGROUP_ROOT", default="")

MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(BASE_DIR / "media")))  # uploads and artifacts
MEDIA_URL = "media/"  # never served directly: downloads go through the API's permission checks
FILE_UPLOAD_PERMISSIONS = 0o640  # uploads and artifacts: the platform's users only
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o750

# --- AI generation --------------------------------------------------------------------------
AI_PROVIDERS = ("openai", "anthropic")
AI_DEFAULT_PROVIDER = env.str("AI_DEFAULT_PROVIDER", default="openai")
if AI_DEFAULT_PROVIDER not in AI_PROVIDERS:
    raise ImproperlyConfigured(f"AI_DEFAULT_PROVIDER must be one of {AI_PROVIDERS}")
AI_DEFAULT_MODEL = env.str("AI_DEFAULT_MODEL", default="")  # for the default provider; else the per-provider one
OPENAI_DEFAULT_MODEL = env.str("OPENAI_DEFAULT_MODEL", default="gpt-4o-mini")
ANTHROPIC_DEFAULT_MODEL = env.str("ANTHROPIC_DEFAULT_MODEL", default="claude-sonnet-4-5")
# The server's keys, used when a job's owner has stored none (BYOK). Base URLs: any compatible server.
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None
ANTHROPIC_API_KEY = env.str("ANTHROPIC_API_KEY", default="")
ANTHROPIC_BASE_URL = env.str("ANTHROPIC_BASE_URL", default="") or None
AI_DEFAULT_MAX_TOKENS = env.int("AI_DEFAULT_MAX_TOKENS", default=1024)
# Tokens (in and out) each user's jobs may use per UTC day on the server's keys (0: no budget).
AI_USER_DAILY_TOKENS = env.int("AI_USER_DAILY_TOKENS", default=0)
AI_REQUEST_TIMEOUT_SECONDS = env.float("AI_REQUEST_TIMEOUT_SECONDS", default=120.0)
# An identical request while the first is queued or running, or succeeded this recently, gets that job.
AI_DEDUPE_TTL = env.int("AI_DEDUPE_TTL", default=300)
PERSONAS_DIR = Path(env.str("PERSONAS_DIR", default=str(BASE_DIR / "personas")))
# Fernet keys for stored provider keys, comma-separated; the first encrypts (see rotate_credentials).
CREDENTIALS_KEYS = env.list("CREDENTIALS_KEYS", default=[])

# --- Messages (apps/messaging, tasks/channels) --------------------------------------------------
# The address Twilio and other callers see (behind a proxy: the public https URL), for webhook
# signatures and status callbacks. Proxy headers (X-Forwarded-Proto/Host) count only when
# TRUST_PROXY_HEADERS is on.
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="").rstrip("/")
TRUST_PROXY_HEADERS = env.bool("TRUST_PROXY_HEADERS", default=False)
if TRUST_PROXY_HEADERS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    USE_X_FORWARDED_HOST = True
# Served over HTTPS only (production, behind TLS): plain HTTP is redirected (except the health and
# metrics probes, which the orchestrator sends in plain HTTP inside the cluster), cookies are
# secure, and browsers are told so (HSTS; raise SECURE_HSTS_SECONDS to a year once it works).
HTTPS_ONLY = env.bool("HTTPS_ONLY", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=HTTPS_ONLY)
SECURE_REDIRECT_EXEMPT = [r"^api/health/$", r"^metrics$"]
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=HTTPS_ONLY)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=3600 if HTTPS_ONLY else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS_ONLY)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=HTTPS_ONLY)  # allows listing; submits nothing
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# The same text to the same destination within this many seconds is delivered once.
MESSAGE_DEDUPE_SECONDS = env.int("MESSAGE_DEDUPE_SECONDS", default=60)
# A rate-limit wait up to this long is waited out in the attempt; a longer one puts the job off.
MESSAGE_MAX_INLINE_WAIT_SECONDS = env.float("MESSAGE_MAX_INLINE_WAIT_SECONDS", default=10.0)
# Requests per second to any one destination (a phone number, a channel, an address), and its burst.
MESSAGE_DESTINATION_RATE_PER_SECOND = env.float("MESSAGE_DESTINATION_RATE_PER_SECOND", default=1.0)
MESSAGE_DESTINATION_BURST = env.int("MESSAGE_DESTINATION_BURST", default=5)
# Who owns the conversations (and their jobs) that strangers start by writing in: a username,
# created (without a usable password) when missing.
MESSAGING_OWNER = env.str("MESSAGING_OWNER", default="conveyor-inbox")
CONVERSATION_PERSONA = env.str("CONVERSATION_PERSONA", default="assistant")
CONVERSATION_HISTORY_TOKENS = env.int("CONVERSATION_HISTORY_TOKENS", default=2000)
# At most this many inbound messages an hour from one sender are answered (each costs a model call); the
# rest are kept, unanswered. 0: no limit.
MESSAGE_INBOUND_PER_HOUR = env.int("MESSAGE_INBOUND_PER_HOUR", default=60)
TWILIO_ACCOUNT_SID = env.str("TWILIO_ACCOUNT_SID", default="")
TWILIO_AUTH_TOKEN = env.str("TWILIO_AUTH_TOKEN", default="")
TWILIO_FROM_NUMBER = env.str("TWILIO_FROM_NUMBER", default="")
TWILIO_MESSAGING_SERVICE_SID = env.str("TWILIO_MESSAGING_SERVICE_SID", default="")
TWILIO_API_BASE_URL = env.str("TWILIO_API_BASE_URL", default="").rstrip("/")  # another server (tests)
TWILIO_TIMEOUT_SECONDS = env.float("TWILIO_TIMEOUT_SECONDS", default=15.0)
SMS_RATE_PER_SECOND = env.float("SMS_RATE_PER_SECOND", default=1.0)  # per sending number (a long code: 1)
# Provider-facing rates are paced this fraction under their setting (see tasks/channels/deliver.py).
MESSAGE_RATE_MARGIN = env.float("MESSAGE_RATE_MARGIN", default=0.05)
SMS_SMART_ENCODING = env.bool("SMS_SMART_ENCODING", default=False)
SMS_HELP_REPLY = env.str(
    "SMS_HELP_REPLY",
    default="Conveyor: replies are written by an AI assistant. Reply STOP to opt out, START to opt in.",
)
DISCORD_BOT_TOKEN = env.str("DISCORD_BOT_TOKEN", default="")
DISCORD_API_BASE_URL = env.str("DISCORD_API_BASE_URL", default="").rstrip("/")  # e.g. http://127.0.0.1:9/api/v10
DISCORD_RATE_PER_SECOND = env.float("DISCORD_RATE_PER_SECOND", default=50.0)  # Discord's global limit per bot
DISCORD_TIMEOUT_SECONDS = env.float("DISCORD_TIMEOUT_SECONDS", default=30.0)
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=30)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="conveyor@localhost")
EMAIL_RATE_PER_SECOND = env.float("EMAIL_RATE_PER_SECOND", default=10.0)  # per SMTP host
EMAIL_WEBHOOK_SECRET = env.str("EMAIL_WEBHOOK_SECRET", default="")
EMAIL_INBOUND_MAX_BYTES = env.int("EMAIL_INBOUND_MAX_BYTES", default=10 * 1024 * 1024)

# Beat runs the reconciler in its own process, and promotes scheduled jobs (apps/jobs/scheduler.py).
CELERY_BEAT_SCHEDULER = "apps.jobs.scheduler:Scheduler"
CELERY_BEAT_SCHEDULE: dict = {}

# --- REST API ---------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["project.parsers.LimitedJSONParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "project.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Conveyor API",
    "DESCRIPTION": "Durable jobs on Celery: submit, watch, cancel, retry.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "apps.jobs.models.Status",
        "MessageStatusEnum": "apps.messaging.models.Message.Status",
    },
    # The event stream is an async Django view (no thread per open stream), which drf-spectacular
    # does not inspect: described here.
    "APPEND_PATHS": {
        "/api/jobs/{id}/stream/": {
            "get": {
                "operationId": "jobs_stream_retrieve",
                "summary": "Server-Sent Events of a job: status, log, progress, text, then end",
                "tags": ["jobs"],
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
                    {
                        "name": "offset",
                        "in": "query",
                        "description": "Start the log from this byte (default 0).",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "security": [{"tokenAuth": []}, {"cookieAuth": []}],
                "responses": {
                    "200": {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": ""},
                    "429": {"description": "Too many open streams (JOBS_MAX_STREAMS_PER_USER), or throttled."},
                },
            }
        }
    },
}

# --- Static files, i18n, logging -------------------------------------------------------------
STATIC_URL = "static/"
# The owner's job pages (/jobs/<id>/) log in with a session; the admin has its own login page.
LOGIN_URL = "login"
LOGOUT_REDIRECT_URL = "login"
LOGIN_REDIRECT_URL = "/api/jobs/"  # (a login without `next`): their jobs, in the browsable API
STATIC_ROOT = BASE_DIR / "staticfiles"
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
}
