"""Rewrite the pickled rows of django-mailer in mailer's JSON format, once.

After this, normal operation never unpickles. A row the legacy reader refuses
is left as it is: when its turn comes it is deferred, with a log row
that says why, for a human to decide.

Going back (``migrate mailer 0009``) pickles the JSON rows again, so that
django-mailer 2.x can read them after a downgrade.

A migration must do the same thing for as long as it exists, so this one
carries its own helpers and uses only the storage API itself (``decode``
reads every stored form; ``email_to_db`` writes the versioned format).
No row's content can stop ``migrate``: a row that cannot be converted is left
as it is, and counted in the output.
"""

import base64
import pickle
from email.mime.base import MIMEBase
from typing import Any

from django.apps.registry import Apps
from django.core.mail import EmailMessage
from django.db import DatabaseError, migrations, router, transaction
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

from mailer.codec import decode, email_to_db

BATCH = 500


def is_pickled(data: str) -> bool:
    """Return whether ``data`` is django-mailer's base64 pickle (or an older raw one), not JSON."""
    return bool(data) and not data.lstrip().startswith("{")


def search_columns(email: EmailMessage) -> dict[str, Any]:
    """Return the searchable columns of migration 0009 for ``email``."""
    columns: dict[str, Any] = {
        "subject": str(email.subject or ""),
        "from_email": str(email.from_email or ""),
        "recipients": ", ".join(map(str, email.recipients())),
    }
    for name, value in (email.extra_headers or {}).items():
        if str(name).lower() == "message-id":
            columns["message_id"] = str(value)
    # Copies for searching: a NUL (which PostgreSQL refuses in text) is dropped.
    return {name: text.replace("\x00", "") for name, text in columns.items()}


def refuse_while_django_mailer_listens(schema_editor: BaseDatabaseSchemaEditor) -> None:
    """Raise while a ``runmailer_pg`` is connected (a session whose last statement LISTENs on django-mailer's
    channel): django-mailer 2.x deletes every message it cannot read, and after this it can read none.
    """
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid <> pg_catalog.pg_backend_pid() "
            "AND datname = pg_catalog.current_database() AND query ~* %s",
            [r"^\s*LISTEN\s+\"?django_mailer_new_message"],
        )
        (listening,) = cursor.fetchone()
    if listening:
        raise RuntimeError(
            f"{listening} session(s) listen on django_mailer_new_message: a runmailer_pg is running. Stop it, "
            "and every other sender of mail on every host, before migrating: django-mailer deletes the "
            "messages this migration converts (see docs/upgrading.rst)."
        )


def convert_to_json(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    refuse_while_django_mailer_listens(schema_editor)
    converted = left = 0
    for model_name in ("Message", "MessageLog"):
        model = apps.get_model("mailer", model_name)
        if not router.allow_migrate_model(schema_editor.connection.alias, model):
            continue  # a database router keeps this table in another database
        rows = model._default_manager.using(schema_editor.connection.alias).exclude(message_data__isnull=True)
        for pk, data in rows.values_list("pk", "message_data").iterator(chunk_size=BATCH):
            if not is_pickled(data):
                continue
            try:
                email = decode(data)
                columns = search_columns(email) if isinstance(email, EmailMessage) else {}
                json_data = email_to_db(email)
            except Exception:  # no row's content may stop migrate
                left += 1  # deferred with the reason when its turn comes
                continue
            if model_name == "MessageLog":
                columns.pop("message_id", None)  # the log row has its own, from the attempt
            try:
                # In a savepoint: a value the database refuses (a NUL on
                # PostgreSQL, an emoji in a utf8mb3 table, a row past
                # max_allowed_packet) leaves this row, not the migration.
                with transaction.atomic(using=schema_editor.connection.alias):
                    rows.filter(pk=pk).update(message_data=json_data, **columns)
            except DatabaseError:
                left += 1
                continue
            converted += 1
    if left:
        print(  # migrate's own output: where an operator reads it
            f"\n  mailer: {converted} pickled row(s) converted to JSON; {left} left as they were, "
            "because they cannot be read (each is deferred, with the reason in the log, when its turn comes)",
            end="",
        )


def convert_to_pickle(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    left = 0
    for model_name in ("Message", "MessageLog"):
        model = apps.get_model("mailer", model_name)
        if not router.allow_migrate_model(schema_editor.connection.alias, model):
            continue  # a database router keeps this table in another database
        rows = model._default_manager.using(schema_editor.connection.alias).exclude(message_data__isnull=True)
        for pk, data in rows.values_list("pk", "message_data").iterator(chunk_size=BATCH):
            if not data or is_pickled(data):
                continue
            try:
                email = decode(data)
                use_standard_classes(email)
                pickled = base64.encodebytes(pickle.dumps(email)).decode("ascii")
            except Exception:  # no row's content may stop migrate
                left += 1
                continue
            try:
                with transaction.atomic(using=schema_editor.connection.alias):
                    rows.filter(pk=pk).update(message_data=pickled)
            except DatabaseError:
                left += 1
    if left:
        print(f"\n  mailer: {left} row(s) left as JSON, which django-mailer cannot read", end="")


def use_standard_classes(email: Any) -> None:
    """Make MIME attachments read back from JSON plain ``MIMEBase`` again: django-mailer cannot import ours."""
    for attachment in getattr(email, "attachments", []):
        if isinstance(attachment, MIMEBase):
            for part in attachment.walk():
                if type(part).__module__.startswith("mailer."):
                    part.__class__ = MIMEBase


class Migration(migrations.Migration):
    dependencies = [("mailer", "0009_search_columns")]

    operations = [migrations.RunPython(convert_to_json, convert_to_pickle, elidable=False)]
