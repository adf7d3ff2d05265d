from django.conf import settings
from rest_framework.throttling import UserRateThrottle


class SubmitThrottle(UserRateThrottle):
    """Submissions per user (a batch counts once). The rate is read per request, so it can be tuned live."""

    scope = "submit"

    def get_rate(self) -> str:
        return settings.JOBS_SUBMIT_RATE


class ReadThrottle(UserRateThrottle):
    scope = "read"

    def get_rate(self) -> str:
        return settings.JOBS_READ_RATE
