"""The migrations are django-mailer's, then ours, and match the models."""

from io import StringIO

import pytest
from django.core.management import call_command
from django.db.migrations.loader import MigrationLoader

DJANGO_MAILER_MIGRATIONS = [
    "0001_initial",
    "0002_auto_20150720_1433",
    "0003_messagelog_message_id",
    "0004_auto_20190920_1512",
    "0005_id_bigautofield",
    "0006_message_retry_count",
    "0007_alter_messagelog_message_data",
]


def test_history_starts_with_django_mailers_migrations_in_order():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    names = []
    node = ("mailer", max(name for app, name in loader.disk_migrations if app == "mailer"))
    while node:
        names.append(node[1])
        parents = [parent for parent in loader.graph.node_map[node].parents if parent[0] == "mailer"]
        node = parents[0] if parents else None
    names.reverse()
    assert names[:7] == DJANGO_MAILER_MIGRATIONS
    assert names[7] == "0008_message_claim"


@pytest.mark.django_db
def test_models_and_migrations_agree():
    out = StringIO()
    call_command("makemigrations", "mailer", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db
def test_tables_are_django_mailers():
    from mailer.models import DontSendEntry, Message, MessageLog

    assert [m._meta.db_table for m in (Message, MessageLog, DontSendEntry)] == [
        "mailer_message",
        "mailer_messagelog",
        "mailer_dontsendentry",
    ]
