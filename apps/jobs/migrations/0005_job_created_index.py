from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0004_fenced_leases_and_queues")]

    operations = [
        migrations.AddIndex("job", models.Index(fields=["-created_at"], name="job_created")),
    ]
