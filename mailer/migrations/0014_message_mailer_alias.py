from django.db import migrations, models


class Migration(migrations.Migration):
    """The MAILERS alias each message was queued through; NULL for every row queued before."""

    dependencies = [
        ("mailer", "0013_subject_copy"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="mailer_alias",
            field=models.CharField(blank=True, editable=False, max_length=100, null=True),
        ),
    ]
