"""A job's database connection in a pool of threads."""

from django.conf import settings
from django.db import connection


def release() -> None:
    """Give this thread's connection back before a long wait (a provider's answer streaming in) when
    connections are pooled (`DB_POOL_SIZE`, as a threads-pool worker sets it): 64 threads streaming
    then share a few connections instead of holding one each. Without a pool the connection is
    the process's own, kept for its next statement."""
    if settings.DATABASES["default"].get("OPTIONS", {}).get("pool"):
        connection.close()
