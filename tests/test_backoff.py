"""How long a job waits before its next attempt: exponential backoff with full jitter, under a cap,
or what the server's Retry-After asked for (within the same cap)."""

from apps.jobs.lifecycle import backoff


def test_backoff_grows_exponentially_under_its_cap_and_honours_retry_after(settings: object) -> None:
    settings.JOBS_RETRY_BASE_SECONDS, settings.JOBS_RETRY_MAX_SECONDS = 1.0, 10.0

    assert all(0 <= backoff(1) <= 1 for _ in range(50))
    assert all(0 <= backoff(3) <= 4 for _ in range(50))
    assert all(backoff(20) <= 10 for _ in range(50))
    assert max(backoff(3) for _ in range(200)) > 1  # jitter spreads over the whole window
    assert backoff(5, retry_after=7) == 7
    assert backoff(5, retry_after=86_400) == 10  # a server cannot park a job beyond the cap
