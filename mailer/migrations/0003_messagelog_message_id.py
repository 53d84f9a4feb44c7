from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("mailer", "0002_auto_20150720_1433")]

    operations = [
        migrations.AddField(
            model_name="messagelog",
            name="message_id",
            field=models.TextField(editable=False, null=True),
        ),
    ]
