"""Signals of the job lifecycle, for apps that build on jobs without the jobs app knowing them."""

from django.dispatch import Signal

# A job that belongs to a conversation (its payload names one) reached a final status. Sent inside the
# transaction that wrote that status, with `job` (as it now is): a receiver's writes (the conversation's
# next step) commit with it or not at all, so a worker that dies in between loses no step.
job_finished = Signal()


def has_followers(job: object) -> bool:
    payload = getattr(job, "payload", None)
    return isinstance(payload, dict) and bool(payload.get("conversation"))
