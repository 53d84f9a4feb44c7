from django.db import migrations, models

PRIORITY_CHOICES = [(1, "high"), (2, "medium"), (3, "low"), (4, "deferred")]


class Migration(migrations.Migration):
    """Store priorities as small integers instead of one-character strings."""

    dependencies = [("mailer", "0003_messagelog_message_id")]

    operations = [
        migrations.AlterField(
            model_name="message",
            name="priority",
            field=models.PositiveSmallIntegerField(choices=PRIORITY_CHOICES, default=2),
        ),
        migrations.AlterField(
            model_name="messagelog",
            name="priority",
            field=models.PositiveSmallIntegerField(choices=PRIORITY_CHOICES),
        ),
        migrations.AlterField(
            model_name="messagelog",
            name="priority",
            field=models.PositiveSmallIntegerField(choices=PRIORITY_CHOICES, db_index=True),
        ),
    ]
