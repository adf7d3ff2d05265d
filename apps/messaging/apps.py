from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "apps.messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from apps.jobs.signals import job_finished
        from apps.messaging import conversations

        job_finished.connect(conversations.on_job_finished, dispatch_uid="messaging.on_job_finished")
