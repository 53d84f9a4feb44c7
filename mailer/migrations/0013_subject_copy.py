"""The searchable subject becomes ``subject_copy``, in the same column "subject": a change of name only.

``subject`` on ``Message`` and ``MessageLog`` is django-mailer's property
again, read from ``message_data`` as 2.x code expects; the database is not
touched.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("mailer", "0012_sending_order_and_purge_indexes")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RenameField("message", "subject", "subject_copy"),
                migrations.AlterField(
                    "message",
                    "subject_copy",
                    models.TextField(blank=True, db_column="subject", default="", editable=False),
                ),
                migrations.RenameField("messagelog", "subject", "subject_copy"),
                migrations.AlterField(
                    "messagelog", "subject_copy", models.TextField(db_column="subject", editable=False, null=True)
                ),
            ],
            database_operations=[],
        ),
    ]
