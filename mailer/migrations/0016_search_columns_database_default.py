from django.db import migrations, models


class Migration(migrations.Migration):
    """A database default for the search columns of 0009, so that a django-mailer process still running during an
    upgrade (which inserts message_data, when_added, priority and retry_count only) can queue mail.
    """

    dependencies = [
        ("mailer", "0015_dont_send_case_insensitive"),
    ]

    operations = [
        migrations.AlterField(
            model_name="message",
            name="subject_copy",
            field=models.TextField(blank=True, db_column="subject", db_default="", default="", editable=False),
        ),
        migrations.AlterField(
            model_name="message",
            name="from_email",
            field=models.TextField(blank=True, db_default="", default="", editable=False),
        ),
        migrations.AlterField(
            model_name="message",
            name="recipients",
            field=models.TextField(blank=True, db_default="", default="", editable=False),
        ),
    ]
