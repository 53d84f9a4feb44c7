"""Indexes on the Message-ID of the queue and of the log, for the admin: a message's last error, its log rows,
and whether a log row's message is still queued are looked up by Message-ID.

Made with SQL of each vendor's own, outside the models' state: the column is
TEXT, which MySQL and MariaDB index only by a prefix, and PostgreSQL's
B-tree refuses a row past about 2.7 KB, which a long Message-ID header could
reach, so PostgreSQL gets a hash index (lookups by equality only, all that
is needed).
"""

from typing import Any

from django.db import migrations, router

INDEXES = {
    "mailer_message_message_id": "Message",
    "mailer_messagelog_message_id": "MessageLog",
}


def _tables(apps: Any, schema_editor: Any) -> dict[str, str]:
    """The indexes to make or drop, by name, with their tables: those that a database router puts here."""
    tables = {}
    for name, model_name in INDEXES.items():
        model = apps.get_model("mailer", model_name)
        if router.allow_migrate_model(schema_editor.connection.alias, model):
            tables[name] = model._meta.db_table
    return tables


def create_indexes(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    quote = schema_editor.quote_name
    for name, table in _tables(apps, schema_editor).items():
        if vendor == "postgresql":
            sql = f"CREATE INDEX {quote(name)} ON {quote(table)} USING hash ({quote('message_id')})"
        elif vendor == "mysql":
            sql = f"CREATE INDEX {quote(name)} ON {quote(table)} ({quote('message_id')}(191))"
        else:
            sql = f"CREATE INDEX {quote(name)} ON {quote(table)} ({quote('message_id')})"
        schema_editor.execute(sql)


def drop_indexes(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    quote = schema_editor.quote_name
    for name, table in _tables(apps, schema_editor).items():
        if vendor == "mysql":
            schema_editor.execute(f"DROP INDEX {quote(name)} ON {quote(table)}")
        else:
            schema_editor.execute(f"DROP INDEX {quote(name)}")


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0016_search_columns_database_default"),
    ]

    operations = [
        migrations.RunPython(create_indexes, drop_indexes, atomic=False, elidable=False),
    ]
