"""On PostgreSQL, a function that says whether any of some addresses is on the don't-send list.

Queueing a message asks this inside the INSERT that queues it. Asked as a
subquery, the question is planned again by every INSERT, which there costs
about a tenth of queueing a message; the server keeps the plan of a
PL/pgSQL function's query for the life of the database connection. Nothing
is prepared by the client, so it works behind a connection pooler too.
Other databases plan the subquery cheaply and get nothing.

Queueing calls the function only where it finds it as made here, and
otherwise asks the subquery, as before (``mailer.models._dont_send_function``):
in a database made without migrations, or where the user that migrates may
not write PL/pgSQL (then this makes nothing). Migrating back leaves it in
place, harmless, as a process that found it may still call it.
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
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_language WHERE lanname = 'plpgsql') "
            "THEN pg_catalog.has_language_privilege('plpgsql', 'USAGE') ELSE false END"
        )
        (may_write_plpgsql,) = cursor.fetchone()
    if not may_write_plpgsql:
        return
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


class Migration(migrations.Migration):
    dependencies = [
        ("mailer", "0018_claims_index_of_claimed_messages_only"),
    ]

    operations = [
        migrations.RunPython(create_function, migrations.RunPython.noop, elidable=False),
    ]
