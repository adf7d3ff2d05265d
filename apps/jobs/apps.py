from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "apps.jobs"
    label = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from apps.jobs import periodic
        from apps.jobs.models import JobTemplate

        # A template's schedule lives in its django-celery-beat PeriodicTask, which beat reads.
        post_save.connect(lambda instance, **kw: periodic.sync(instance), sender=JobTemplate, weak=False)
        post_delete.connect(lambda instance, **kw: periodic.forget(instance), sender=JobTemplate, weak=False)
