from django.db import migrations, models


def big_auto_id() -> "models.BigAutoField[int, int]":
    return models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")


class Migration(migrations.Migration):
    dependencies = [("mailer", "0004_auto_20190920_1512")]

    operations = [
        migrations.AlterField(model_name="dontsendentry", name="id", field=big_auto_id()),
        migrations.AlterField(model_name="message", name="id", field=big_auto_id()),
        migrations.AlterField(model_name="messagelog", name="id", field=big_auto_id()),
    ]
