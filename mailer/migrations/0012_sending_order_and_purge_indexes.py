"""Indexes for claiming messages (the sending order, a pass's claims) and for ``purge_mail_log``."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0011_retry_after_failed_permanently"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["priority", "when_added", "id"], name="mailer_message_sending_order"),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["claimed_until"], name="mailer_message_claims"),
        ),
        migrations.AddIndex(
            model_name="messagelog",
            index=models.Index(fields=["result", "when_attempted"], name="mailer_messagelog_purge"),
        ),
    ]
