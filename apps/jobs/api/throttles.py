"""Throttles whose counters live in the shared cache (Redis) and, while it is unreachable, in each
process: a Redis outage must not take the API down with it, and limits still hold, per process."""

import logging
from typing import Any

from django.conf import settings
from django.core.cache import cache as shared_cache
from django.core.cache.backends.locmem import LocMemCache
from rest_framework.throttling import UserRateThrottle

log = logging.getLogger(__name__)


class FallbackCache:
    """The default cache, or this process's own memory while the default one fails."""

    def __init__(self) -> None:
        self.local = LocMemCache("throttles", {"OPTIONS": {"MAX_ENTRIES": 100_000}})
        self.failing = False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            value = getattr(shared_cache, method)(*args, **kwargs)
        except Exception as exc:
            if not self.failing:
                log.warning("throttling: the shared cache is unreachable (%s); counting per process", exc)
                self.failing = True
            return getattr(self.local, method)(*args, **kwargs)
        if self.failing:
            log.warning("throttling: the shared cache is back")
            self.failing = False
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", key, default)

    def set(self, key: str, value: Any, timeout: Any = None) -> None:
        self._call("set", key, value, timeout)


throttle_cache = FallbackCache()


class SubmitThrottle(UserRateThrottle):
    """Submissions per user (a batch counts once). The rate is read per request, so it can be tuned live."""

    scope = "submit"
    cache = throttle_cache

    def get_rate(self) -> str:
        return settings.JOBS_SUBMIT_RATE


class ReadThrottle(UserRateThrottle):
    scope = "read"
    cache = throttle_cache

    def get_rate(self) -> str:
        return settings.JOBS_READ_RATE
