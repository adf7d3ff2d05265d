"""Signals of the job lifecycle, for apps that build on jobs without the jobs app knowing them."""

from django.dispatch import Signal

# A job of a kind that asks for it (`Kind.signals_finish`), or that belongs to a conversation (its
# payload names one), reached a final status. Sent inside the transaction that wrote that status, with
# `job` (as it now is): a receiver's writes (the conversation's next step, the latest delivery
# statuses) commit with it or not at all, so a worker that dies in between loses no step.
job_finished = Signal()


def has_followers(job: object) -> bool:
    from apps.jobs.kinds import KINDS

    kind = KINDS.get(getattr(job, "kind", ""))
    if kind is not None and kind.signals_finish is not None and kind.signals_finish(job):
        return True
    payload = getattr(job, "payload", None)
    return isinstance(payload, dict) and bool(payload.get("conversation"))
