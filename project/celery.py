import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("conveyor")
app.config_from_object("django.conf:settings", namespace="CELERY")
# autodiscover_tasks() only finds `<app>.tasks`; the worker code lives in the top-level `tasks/`
# package, so its task modules are listed here.
app.conf.imports = ("tasks.entrypoints",)
