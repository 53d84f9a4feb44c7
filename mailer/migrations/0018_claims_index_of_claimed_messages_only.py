"""The index of claims holds claimed messages only, so that queueing a message writes no entry in it.

Every query it serves names a claim (``claimed_until`` equal to, or later
than, a time), which no unclaimed message has. MariaDB and MySQL have no
partial indexes: there it is made whole again, as before.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0017_message_id_indexes"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="message", name="mailer_message_claims"),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                fields=["claimed_until"],
                name="mailer_message_claims",
                condition=models.Q(claimed_until__isnull=False),
            ),
        ),
    ]
