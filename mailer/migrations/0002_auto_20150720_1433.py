from django.db import migrations, models


class Migration(migrations.Migration):
    """Widen DontSendEntry.to_address to 254 characters (a no-op on databases that already have it)."""

    dependencies = [("mailer", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="dontsendentry",
            name="to_address",
            field=models.EmailField(max_length=254),
        ),
    ]
