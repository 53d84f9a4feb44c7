"""Rewrite the pickled rows of django-mailer in mailer's JSON format, once.

After this, normal operation never unpickles. A row the restricted unpickler
refuses is left as it is: when its turn comes it is deferred, with a log row
that says why, for a human to decide.

Going back (``migrate mailer 0009``) pickles the JSON rows again, so that
django-mailer 2.x can read them after a downgrade.
"""

import base64
import pickle
from email.mime.base import MIMEBase

from django.db import migrations

from mailer.codec import (
    StoredMIMEBase,
    UndecodableData,
    UnstorableEmail,
    decode,
    email_to_db,
    is_legacy,
    search_columns,
)

BATCH = 500


def convert_to_json(apps, schema_editor):
    for model_name in ("Message", "MessageLog"):
        model = apps.get_model("mailer", model_name)
        rows = model.objects.using(schema_editor.connection.alias).exclude(message_data__isnull=True)
        for pk, data in rows.values_list("pk", "message_data").iterator(chunk_size=BATCH):
            if not is_legacy(data):
                continue
            try:
                email = decode(data)
                converted = email_to_db(email)
            except (UndecodableData, UnstorableEmail):
                continue  # left as it is; deferred with the reason when its turn comes
            columns = search_columns(email)
            if model_name == "MessageLog":
                del columns["message_id"]  # the log row has its own, from the attempt
            rows.filter(pk=pk).update(message_data=converted, **columns)


def convert_to_pickle(apps, schema_editor):
    for model_name in ("Message", "MessageLog"):
        model = apps.get_model("mailer", model_name)
        rows = model.objects.using(schema_editor.connection.alias).exclude(message_data__isnull=True)
        for pk, data in rows.values_list("pk", "message_data").iterator(chunk_size=BATCH):
            if not data or is_legacy(data):
                continue
            try:
                email = decode(data)
            except UndecodableData:
                continue
            _use_standard_classes(email)
            pickled = base64.encodebytes(pickle.dumps(email)).decode("ascii")
            rows.filter(pk=pk).update(message_data=pickled)


def _use_standard_classes(email):
    """Make MIME attachments read back from JSON plain ``MIMEBase`` again: django-mailer has no ``mailer.codec``."""
    for attachment in getattr(email, "attachments", []):
        if isinstance(attachment, StoredMIMEBase):
            for part in attachment.walk():
                if type(part) is StoredMIMEBase:
                    part.__class__ = MIMEBase


class Migration(migrations.Migration):
    dependencies = [("mailer", "0009_search_columns")]

    operations = [migrations.RunPython(convert_to_json, convert_to_pickle, elidable=False)]
