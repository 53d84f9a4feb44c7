from typing import Any

from django.db import migrations, models


def searchable(**options: Any) -> "models.TextField[str, str]":
    return models.TextField(editable=False, **options)


class Migration(migrations.Migration):
    """Copy subject, sender, recipients and Message-ID out of message_data, so they can be searched."""

    dependencies = [("mailer", "0008_message_claim")]

    operations = [
        migrations.AddField("message", "from_email", searchable(blank=True, default="")),
        migrations.AddField("message", "recipients", searchable(blank=True, default="")),
        migrations.AddField("message", "subject", searchable(blank=True, default="")),
        migrations.AddField("message", "message_id", searchable(null=True)),
        migrations.AddField("messagelog", "from_email", searchable(null=True)),
        migrations.AddField("messagelog", "recipients", searchable(null=True)),
        migrations.AddField("messagelog", "subject", searchable(null=True)),
    ]
