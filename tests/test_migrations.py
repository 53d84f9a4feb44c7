"""The migrations are django-mailer's, then ours, and match the models."""

import base64
import json
import pickle
from io import StringIO
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.utils import timezone

from mailer.codec import decode, email_to_db
from mailer.models import PRIORITY_MEDIUM, RESULT_SUCCESS, Message, MessageLog

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
    node: tuple[str, str] | None = ("mailer", max(name for app, name in loader.disk_migrations if app == "mailer"))
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
    from mailer.models import DontSendEntry

    assert [m._meta.db_table for m in (Message, MessageLog, DontSendEntry)] == [
        "mailer_message",
        "mailer_messagelog",
        "mailer_dontsendentry",
    ]


# --------------------------------------------------------------------------
# Migration 0010: django-mailer's pickles become JSON
# --------------------------------------------------------------------------

BEFORE_CONVERSION = "0009_search_columns"


def migrate_mailer(target: str) -> None:
    """Apply or unapply mailer's migrations up to ``target`` on the test database, as ``migrate mailer`` does."""
    executor = MigrationExecutor(connection)
    executor.migrate([("mailer", target)])


def latest_mailer_migration() -> str:
    (leaf,) = MigrationLoader(None, ignore_no_migrations=True).graph.leaf_nodes("mailer")
    return leaf[1]


class HistoricalModels(NamedTuple):
    Message: Any
    MessageLog: Any


def models_before_conversion() -> HistoricalModels:
    """``Message`` and ``MessageLog`` as they are at 0009: the tables' columns then, and no custom ``save()``.

    Rows of a database at 0009 (or at 0010, which only rewrites rows) must be
    written and read with these: today's models have columns that later
    migrations add. Their ``save()`` fills no search column, as django-mailer's
    did not.
    """
    apps = MigrationExecutor(connection).loader.project_state(("mailer", BEFORE_CONVERSION)).apps
    return HistoricalModels(apps.get_model("mailer", "Message"), apps.get_model("mailer", "MessageLog"))


@pytest.fixture
def before_conversion(transactional_db):
    """The test database as django-mailer left it plus our columns: mailer migrated back to 0009.

    The test inserts rows with ``models_before_conversion()`` (or SQL), then
    applies 0010 itself; to use today's models or the engine after that, it
    applies the latest migration (``latest_mailer_migration()``). Afterwards
    all migrations are applied again whatever happened.
    """
    migrate_mailer(BEFORE_CONVERSION)
    yield
    migrate_mailer(latest_mailer_migration())


def pickled_row(email, protocol: int = pickle.DEFAULT_PROTOCOL) -> str:
    """An email as django-mailer 2.x stored it: base64 of its pickle."""
    return base64.encodebytes(pickle.dumps(email, protocol=protocol)).decode("ascii")


def legacy_email(subject: str, **kwargs) -> EmailMultiAlternatives:
    email = EmailMultiAlternatives(
        subject,
        kwargs.pop("body", "Body"),
        kwargs.pop("from_email", "Sender <s@example.com>"),
        kwargs.pop("to", ["to@example.com"]),
        **kwargs,
    )
    return email


def test_migration_0010_rewrites_pickled_queue_rows_as_json_and_fills_the_search_columns(before_conversion):
    """Each pickled row (django-mailer 2.x's base64, and the raw pickle of releases before 2.0) becomes JSON.

    The JSON decodes to the same email, and subject, sender, recipients and
    Message-ID, which 0009 added empty, now hold what the email says.
    """
    rich = legacy_email(
        "Rich ✓",
        cc=["cc@example.com"],
        bcc=["bcc@example.com"],
        headers={"Message-ID": "<rich@example.com>", "X-Campaign": "q3"},
    )
    rich.attach_alternative("<p>Html</p>", "text/html")
    rich.attach("data.bin", b"\x00\x01\xff", "application/octet-stream")
    old = EmailMessage("Before 2.0", "Old body", "old@example.com", ["old-to@example.com"])
    historical = models_before_conversion()
    base64_row = historical.Message.objects.create(message_data=pickled_row(rich))
    raw_row = historical.Message.objects.create(message_data=pickle.dumps(old, protocol=0).decode("ascii"))
    json_before = email_to_db(EmailMessage("Already JSON", "B", "j@example.com", ["j-to@example.com"]))
    json_row = historical.Message.objects.create(message_data=json_before)

    migrate_mailer("0010_convert_pickled_message_data")

    base64_row.refresh_from_db()
    assert json.loads(base64_row.message_data)["mailer"] == 1
    assert (base64_row.subject, base64_row.from_email, base64_row.recipients, base64_row.message_id) == (
        "Rich ✓",
        "Sender <s@example.com>",
        "to@example.com, cc@example.com, bcc@example.com",
        "<rich@example.com>",
    )
    decoded = decode(base64_row.message_data)
    assert (decoded.bcc, decoded.extra_headers["X-Campaign"], decoded.alternatives[0].content) == (
        ["bcc@example.com"],
        "q3",
        "<p>Html</p>",
    )
    assert decoded.attachments[0].content == b"\x00\x01\xff"

    raw_row.refresh_from_db()
    assert json.loads(raw_row.message_data)["mailer"] == 1
    assert (raw_row.subject, raw_row.from_email, raw_row.recipients) == (
        "Before 2.0",
        "old@example.com",
        "old-to@example.com",
    )
    assert raw_row.message_id is None  # the email had none; the engine gives it one when sending
    assert decode(raw_row.message_data).body == "Old body"

    json_row.refresh_from_db()
    assert json_row.message_data == json_before


def test_migration_0010_converts_the_log_but_keeps_each_rows_own_message_id(before_conversion):
    """A log row's ``message_id`` is that of the attempt it records; the conversion fills only the other columns."""
    email = legacy_email("Logged", headers={"Message-ID": "<in-the-pickle@example.com>"})
    historical = models_before_conversion()
    log = historical.MessageLog.objects.create(
        message_data=pickled_row(email),
        message_id="<the-attempt@example.com>",
        when_added=timezone.now(),
        priority=PRIORITY_MEDIUM,
        result=RESULT_SUCCESS,
        log_message="",
    )
    without_data = historical.MessageLog.objects.create(
        message_data=None, when_added=timezone.now(), priority=PRIORITY_MEDIUM, result=RESULT_SUCCESS, log_message=""
    )

    migrate_mailer("0010_convert_pickled_message_data")

    log.refresh_from_db()
    assert json.loads(log.message_data)["mailer"] == 1
    assert (log.subject, log.from_email, log.recipients, log.message_id) == (
        "Logged",
        "Sender <s@example.com>",
        "to@example.com",
        "<the-attempt@example.com>",
    )
    without_data.refresh_from_db()
    assert (without_data.message_data, without_data.subject) == (None, None)


def test_migration_0010_refuses_to_run_while_django_mailers_runmailer_pg_is_connected(before_conversion):
    """django-mailer deletes each message it cannot read: after 0010, every one it comes to."""
    if connection.vendor != "postgresql":
        pytest.skip("runmailer_pg is PostgreSQL's")
    old = models_before_conversion()
    old.Message.objects.create(message_data=pickled_row(legacy_email("Queued")), priority="2")
    listener = connection.get_new_connection(connection.get_connection_params())
    listener.autocommit = True
    try:
        listener.cursor().execute("LISTEN django_mailer_new_message;")  # as django-mailer 2.3.2 listens
        with pytest.raises(RuntimeError, match="1 session.* listen on django_mailer_new_message"):
            migrate_mailer("0010_convert_pickled_message_data")
    finally:
        listener.close()
    migrate_mailer("0010_convert_pickled_message_data")

    assert decode(old.Message.objects.get().message_data).subject == "Queued"


def test_migration_0010_leaves_a_row_json_cannot_hold_as_it_was(before_conversion):
    """A pickled email with a value JSON has no type for (a set) stays pickled, so migrate does not fail.

    The engine reads such a row when its turn comes; the row beside it is
    converted as usual.
    """
    tagged = legacy_email("Tagged")
    tagged.tags = {"a", "b"}  # type: ignore[attr-defined]
    historical = models_before_conversion()
    unconvertible = historical.Message.objects.create(message_data=pickled_row(tagged))
    before = unconvertible.message_data
    convertible = historical.Message.objects.create(message_data=pickled_row(legacy_email("Plain")))

    migrate_mailer("0010_convert_pickled_message_data")

    unconvertible.refresh_from_db()
    assert unconvertible.message_data == before
    assert unconvertible.subject == ""
    convertible.refresh_from_db()
    assert (json.loads(convertible.message_data)["mailer"], convertible.subject) == (1, "Plain")


@pytest.mark.django_db
def test_the_message_id_of_the_queue_and_of_the_log_is_indexed_on_every_database():
    """The admin looks up a message's log rows, its last error and whether it is still queued by Message-ID."""
    from django.db import connection

    with connection.cursor() as cursor:
        for table, index in [
            ("mailer_message", "mailer_message_message_id"),
            ("mailer_messagelog", "mailer_messagelog_message_id"),
        ]:
            constraints = connection.introspection.get_constraints(cursor, table)
            assert index in constraints, sorted(constraints)
            assert constraints[index]["index"]
    # A long Message-ID still fits (PostgreSQL's B-tree would refuse one past about 2.7 KB; the index is a hash).
    from django.utils import timezone

    from mailer.models import MessageLog

    long_id = "<" + "x" * 5000 + "@example.com>"
    MessageLog.objects.create(
        message_data="{}", message_id=long_id, result="1", log_message="", priority=2, when_added=timezone.now()
    )
    assert MessageLog.objects.filter(message_id=long_id).count() == 1


class ListAndLogElsewhere:
    """A database router that keeps the don't-send list and the log in another database than this one."""

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        if model_name in ("dontsendentry", "messagelog"):
            return db == "elsewhere"
        return None


def test_data_migrations_leave_alone_the_tables_a_router_keeps_in_another_database(settings, db):
    """Migrating each database of such a site must not reach for a table that is not there."""
    import importlib

    from mailer.models import DontSendEntry

    merge = importlib.import_module("mailer.migrations.0015_dont_send_case_insensitive").merge_case_duplicates
    indexes = importlib.import_module("mailer.migrations.0017_message_id_indexes")
    DontSendEntry.objects.create(to_address="a@example.com", when_added=timezone.now())
    DontSendEntry.objects.update(to_address="A@Example.com")  # as django-mailer stored it
    apps = MigrationLoader(connection).project_state(("mailer", latest_mailer_migration())).apps
    settings.DATABASE_ROUTERS = [ListAndLogElsewhere()]

    editor = SimpleNamespace(connection=connection)  # what the two functions read of their schema editor
    merge(apps, editor)
    tables = indexes._tables(apps, editor)

    assert DontSendEntry.objects.get().to_address == "A@Example.com"
    assert tables == {"mailer_message_message_id": "mailer_message"}
    settings.DATABASE_ROUTERS = []
    merge(apps, editor)
    assert DontSendEntry.objects.get().to_address == "a@example.com"
