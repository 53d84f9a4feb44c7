"""Each address once on the don't-send list, whatever its case.

Entries that differ only in case are merged first, keeping the oldest (the
lookup was always case-insensitive, so nothing that was kept from being sent
is sent now). The unique constraint on ``LOWER(to_address)`` is created where
the database can index an expression; on MariaDB it is not, and
``DontSendEntry.save`` and the admin's form refuse a duplicate instead.
"""

from typing import Any

import django.db.models.functions.text
from django.db import migrations, models, router


def merge_case_duplicates(apps: Any, schema_editor: Any) -> None:
    """Delete every entry whose address, lower-cased, an older entry already has; lower-case the rest.

    Stored lower-cased (as ``DontSendEntry.save`` stores them now), addresses
    match on SQLite too, whose LOWER() leaves non-ASCII capitals as they are.
    """
    model = apps.get_model("mailer", "DontSendEntry")
    if not router.allow_migrate_model(schema_editor.connection.alias, model):
        return  # a database router keeps the list in another database
    entries = model.objects.using(schema_editor.connection.alias)
    seen: set[str] = set()
    duplicates = []
    capitals = []
    for pk, address in entries.order_by("when_added", "pk").values_list("pk", "to_address").iterator():
        key = address.lower()
        if key in seen:
            duplicates.append(pk)
        else:
            seen.add(key)
            if key != address:
                capitals.append((pk, key))
    for start in range(0, len(duplicates), 500):
        entries.filter(pk__in=duplicates[start : start + 500]).delete()
    for pk, key in capitals:
        entries.filter(pk=pk).update(to_address=key)


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0014_message_mailer_alias"),
    ]

    operations = [
        migrations.RunPython(merge_case_duplicates, migrations.RunPython.noop, elidable=True),
        migrations.AddConstraint(
            model_name="dontsendentry",
            constraint=models.UniqueConstraint(
                django.db.models.functions.text.Lower("to_address"),
                name="mailer_dontsendentry_address_unique",
                violation_error_message="This address is already on the don't send list.",
            ),
        ),
    ]
