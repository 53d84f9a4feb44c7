"""On PostgreSQL, a function that says whether any of some addresses is on the don't-send list.

Queueing a message asks this inside the INSERT that queues it. Asked as a
subquery, the question is planned again by every INSERT, which there costs
about a tenth of queueing a message; the statements of a PL/pgSQL function
keep their plan for the life of the connection (client-side, so that it
works behind a connection pooler). Other databases plan the subquery
cheaply and get nothing.

A database made without migrations has no function: queueing then asks
the subquery, as before (``mailer.models.insert_unless_listed``).
"""

from typing import Any

from django.db import migrations, router

FUNCTION = "mailer_dontsendentry_any"


def create_function(apps: Any, schema_editor: Any) -> None:
    model = apps.get_model("mailer", "DontSendEntry")
    if schema_editor.connection.vendor != "postgresql":
        return
    if not router.allow_migrate_model(schema_editor.connection.alias, model):
        return  # a database router keeps the list in another database
    quote = schema_editor.quote_name
    table = quote(model._meta.db_table)
    column = quote(model._meta.get_field("to_address").column)
    # The addresses are bare and lower-cased, as the list's unique index on LOWER(to_address) holds them.
    # Names of the model, quoted; the function takes the addresses as its argument.
    query = f"SELECT 1 FROM {table} WHERE LOWER({column}) = ANY (addresses)"  # noqa: S608
    schema_editor.execute(
        f"CREATE OR REPLACE FUNCTION {FUNCTION}(addresses text[]) RETURNS boolean LANGUAGE plpgsql STABLE AS $$ "
        f"BEGIN RETURN EXISTS ({query}); END $$"
    )


def drop_function(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}(text[])")


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0018_claims_index_of_claimed_messages_only"),
    ]

    operations = [
        migrations.RunPython(create_function, drop_function, elidable=False),
    ]
