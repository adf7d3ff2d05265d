"""The test suite's override: real PostgreSQL, short leases and backoffs.

REDIS_URL is set before this runs, by tests/redis_plugin.py (a private redis-server).
"""

import os
import tempfile

os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/conveyor")
os.environ.setdefault("JOBS_HEARTBEAT_SECONDS", "0.5")
os.environ.setdefault("JOBS_LEASE_SECONDS", "3")
os.environ.setdefault("JOBS_REDISPATCH_GRACE_SECONDS", "1")
os.environ.setdefault("JOBS_RETRY_BASE_SECONDS", "0.2")
os.environ.setdefault("JOBS_RETRY_MAX_SECONDS", "1")
os.environ.setdefault("JOBS_HARD_TIMEOUT_GRACE_SECONDS", "3")
os.environ.setdefault("CALLBACK_ALLOWED_HOSTS", "127.0.0.1")
os.environ.setdefault("JOB_GIT_SCHEMES", "https,file")
os.environ.setdefault("JOB_GIT_FILE_ROOTS", tempfile.gettempdir())
# Fixed Fernet keys shared by the test process and its workers (the first encrypts).
os.environ.setdefault("CREDENTIALS_KEYS", "Z-Y9W4NcFlMODUZo5cs1ie-guWMgD64qdtXR2LBZym8=")
# Messaging: the channels' credentials as the local fake servers (tests/fake_*.py) expect them; their
# addresses are given to the worker by the test fixtures.
os.environ.setdefault("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
os.environ.setdefault("TWILIO_AUTH_TOKEN", "test-token")
os.environ.setdefault("TWILIO_FROM_NUMBER", "+15550000001")
os.environ.setdefault("DISCORD_BOT_TOKEN", "bot-token")
os.environ.setdefault("PUBLIC_BASE_URL", "http://testserver")
os.environ.setdefault("EMAIL_WEBHOOK_SECRET", "email-webhook-secret")
os.environ.setdefault("DEFAULT_FROM_EMAIL", "conveyor@example.test")
os.environ.setdefault("SMS_RATE_PER_SECOND", "100")
os.environ.setdefault("MESSAGE_DESTINATION_RATE_PER_SECOND", "100")
os.environ.setdefault("MESSAGE_DESTINATION_BURST", "20")
os.environ.setdefault("MEDIA_ROOT", os.path.join(tempfile.gettempdir(), "conveyor-test-media"))

from project.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
