from django.db import migrations, models


class Migration(migrations.Migration):
    """When a message may be tried again, and whether the mail server refused it for good.

    ``failed_permanently`` has a database default, so that django-mailer 2.x
    code still running during a rolling upgrade can queue mail.
    """

    dependencies = [("mailer", "0010_convert_pickled_message_data")]

    operations = [
        migrations.AddField(
            "message",
            "retry_after",
            models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            "message",
            "failed_permanently",
            models.BooleanField(db_default=False, default=False, editable=False),
        ),
    ]
