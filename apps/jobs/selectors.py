"""Reads: which jobs a user may see."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from apps.jobs.models import Job


def jobs_visible_to(user: AbstractBaseUser) -> QuerySet[Job]:
    jobs = Job.objects.all()
    return jobs if user.is_staff else jobs.filter(owner=user)
