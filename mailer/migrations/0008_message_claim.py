from django.db import migrations, models


class Migration(migrations.Migration):
    """Let a sending pass claim a message, so no other worker sends it at the same time."""

    dependencies = [("mailer", "0007_alter_messagelog_message_data")]

    operations = [
        migrations.AddField(
            model_name="message",
            name="claimed_by",
            field=models.CharField(blank=True, editable=False, max_length=64, null=True),
        ),
        migrations.AddField(
            model_name="message",
            name="claimed_until",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
    ]
