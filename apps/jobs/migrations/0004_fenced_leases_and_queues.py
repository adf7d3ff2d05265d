from django.db import migrations, models
from django.db.models import Q

# The queue of each kind when this migration was written (apps.jobs.kinds is the source of truth).
QUEUES = {"echo": "default", "ai_generate": "ai", "build": "builds", "test": "builds", "lint": "builds"}


def fill_queues(apps: object, schema_editor: object) -> None:
    Job = apps.get_model("jobs", "Job")
    for kind, queue in QUEUES.items():
        Job.objects.filter(kind=kind).update(queue=queue)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0003_job_dedupe_key")]

    operations = [
        migrations.RenameField("job", "runner", "process"),
        migrations.AlterField(
            "job",
            "process",
            models.CharField(
                blank=True, help_text="host:pid@boot:pid-namespace of the process running the attempt", max_length=200
            ),
        ),
        migrations.AddField("job", "lease", models.UUIDField(blank=True, editable=False, null=True)),
        migrations.AddField("job", "queue", models.CharField(default="default", max_length=16)),
        migrations.AddField("job", "handbacks", models.PositiveSmallIntegerField(default=0)),
        migrations.AlterField(
            "job", "heartbeat_at", models.DateTimeField(blank=True, help_text="the database's clock", null=True)
        ),
        migrations.RunPython(fill_queues, migrations.RunPython.noop),
        migrations.RemoveIndex("job", "job_active"),
        migrations.AddIndex(
            "job", models.Index(condition=Q(status="scheduled"), fields=["run_at"], name="job_scheduled")
        ),
        migrations.AddIndex(
            "job",
            models.Index(
                fields=["status", "queue", "priority", "queued_at"],
                name="job_active",
                condition=Q(status__in=["scheduled", "queued", "running", "retrying"]),
            ),
        ),
    ]
