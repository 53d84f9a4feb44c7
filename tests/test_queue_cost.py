"""What queueing costs the database: a fixed number of statements, however many messages.

A site that queues a newsletter through ``DbBackend`` (or ``send_mass_mail``)
must not pay a query per message, and one that queues a message per request
must pay no more than the INSERT and the don't-send lookup.
"""

import math
import os

import pytest
from django.core.mail import EmailMessage
from django.db import DatabaseError, connection, connections, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import mailer
from mailer.backend import BATCH_DATA_SIZE, DbBackend
from mailer.models import DontSendEntry, Message

pytestmark = pytest.mark.django_db

# sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, which Python names from 3.11 on.
SQLITE_LIMIT_VARIABLE_NUMBER = 9

TRANSACTION_CONTROL = ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT")


def statements(queries: CaptureQueriesContext) -> list[str]:
    """The SQL statements run, without those that only open and close transactions."""
    return [q["sql"] for q in queries.captured_queries if not q["sql"].lstrip().upper().startswith(TRANSACTION_CONTROL)]


def dont_send_lookups(sql: list[str]) -> list[str]:
    return [s for s in sql if s.lstrip().upper().startswith("SELECT") and "mailer_dontsendentry" in s]


def inserts(sql: list[str]) -> list[str]:
    return [s for s in sql if s.lstrip().upper().startswith("INSERT") and "mailer_message" in s]


def newsletter(count: int) -> list[EmailMessage]:
    return [EmailMessage(f"Issue {n}", "Body", "news@example.com", [f"reader{n}@example.com"]) for n in range(count)]


def test_send_mail_costs_one_statement_that_checks_the_dont_send_list_itself():
    """What a web page waits for: the INSERT, no more (its don't-send check rides inside it)."""
    DontSendEntry.objects.create(to_address="someone.else@example.com", when_added=timezone.now())

    with CaptureQueriesContext(connection) as queries:
        assert mailer.send_mail("Subject", "Body", "from@example.com", ["a@example.com", "Bob <B@Example.com>"]) == 1

    sql = statements(queries)
    assert len(sql) == 1 and inserts(sql) and "mailer_dontsendentry" in sql[0], sql
    assert Message.objects.get().email.to == ["a@example.com", "Bob <B@Example.com>"]


def test_a_listed_recipient_costs_a_lookup_more_and_is_dropped():
    DontSendEntry.objects.create(to_address="b@example.com", when_added=timezone.now())

    with CaptureQueriesContext(connection) as queries:
        assert mailer.send_mail("Subject", "Body", "from@example.com", ["a@example.com", "Bob <B@Example.com>"]) == 1

    sql = statements(queries)
    assert len(sql) == 3 and len(dont_send_lookups(sql)) == 1, sql  # the refused INSERT, the lookup, the INSERT
    assert Message.objects.get().email.to == ["a@example.com"]


class DontSendListOnAReplica:
    """A database router that reads the don't-send list from the replica (and everything else by default)."""

    def db_for_read(self, model, **hints):
        return "replica" if model is DontSendEntry else None


@pytest.mark.skipif(
    connection.vendor != "postgresql" or not connection.settings_dict["OPTIONS"].get("server_side_binding"),
    reason="PostgreSQL with psycopg's prepared statements (MAILER_TEST_PG_PREPARED=1)",
)
def test_with_prepared_statements_postgresql_plans_the_queueing_insert_once_per_connection():
    """Where the site turns prepared statements on (docs/performance.rst), messages of one shape are queued by
    one statement, planned once: the don't-send check inside it is then not planned again for every message.
    """
    for number in range(8):
        mailer.send_mail(f"Subject {number}", f"Body {number}", "from@example.com", [f"r{number}@example.com"])

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s", ['INSERT INTO "mailer_message"%']
        )
        prepared = [row[0] for row in cursor.fetchall()]
    assert len(prepared) == 1 and "mailer_dontsendentry" in prepared[0], prepared
    assert Message.objects.count() == 8


def test_a_web_process_keeps_no_statement_for_each_number_of_recipients_it_ever_queued_to():
    """The statements kept for queueing stay few however many recipients a long-running process's messages have:
    one for each number up to 20, none beyond.
    """
    from mailer import models

    def queue_to(count: int) -> None:
        mailer.send_mail("Subject", "Body", "from@example.com", [f"r{n}@example.com" for n in range(count)])

    models._INSERTS_UNLESS_LISTED.clear()
    queue_to(20)
    kept = dict(models._INSERTS_UNLESS_LISTED)
    for count in range(21, 81):
        queue_to(count)

    assert len(kept) == 1
    still_kept = models._INSERTS_UNLESS_LISTED
    assert still_kept == kept
    assert Message.objects.count() == 61


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_the_dont_send_list_is_read_where_the_router_reads_it(settings):
    """Not inside the INSERT, which runs where messages are written: the list may live elsewhere."""
    DontSendEntry.objects.create(to_address="b@example.com", when_added=timezone.now())
    settings.DATABASE_ROUTERS = [DontSendListOnAReplica()]

    with CaptureQueriesContext(connections["replica"]) as replica, CaptureQueriesContext(connection) as default:
        mailer.send_mail("Subject", "Body", "from@example.com", ["a@example.com", "b@example.com"])

    assert len(dont_send_lookups(statements(replica))) == 1
    assert [s for s in statements(default) if "mailer_dontsendentry" in s] == []
    assert Message.objects.get().email.to == ["a@example.com"]


@pytest.mark.django_db(transaction=True)
def test_under_repeatable_read_on_mysql_queueing_leaves_the_dont_send_list_unlocked():
    """InnoDB's INSERT ... SELECT locks what it reads there: an unsubscribe would wait for every open transaction
    that queued mail (ATOMIC_REQUESTS), and two such would deadlock. Django's own level, READ COMMITTED, does not.
    """
    if connection.vendor != "mysql":
        pytest.skip("locking reads under REPEATABLE READ are InnoDB's")
    options = connection.settings_dict.setdefault("OPTIONS", {})
    previous = options.get("isolation_level")
    options["isolation_level"] = "repeatable read"
    other = connection.get_new_connection(connection.get_connection_params())
    other.autocommit(True)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        other.cursor().execute("SET SESSION innodb_lock_wait_timeout = 2")
        with transaction.atomic():
            mailer.send_mail("Held", "Body", "from@example.com", ["zz@example.com"])
            # An unsubscribe, in another request, while this one is still open.
            other.cursor().execute(
                "INSERT INTO mailer_dontsendentry (to_address, when_added) VALUES ('aa@example.com', NOW())"
            )
    finally:
        other.close()
        options.pop("isolation_level") if previous is None else options.update(isolation_level=previous)
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")

    assert DontSendEntry.objects.filter(to_address="aa@example.com").exists()
    assert Message.objects.get().subject == "Held"


@pytest.mark.parametrize("size", [0, -1, "50"])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_and_nothing_queued(settings, size):
    settings.MAILER_MESSAGES_BATCH_SIZE = size

    with pytest.raises(ValueError, match="MAILER_MESSAGES_BATCH_SIZE"):
        DbBackend().send_messages(newsletter(3))
    assert Message.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_failed_insert_spoils_the_callers_transaction_as_the_orms_would():
    """The caller's atomic() block cannot go on to commit half of its work as if nothing had failed."""
    with connection.cursor() as cursor:
        for statement in REFUSE_POISON[connection.vendor]:
            cursor.execute(statement)
    try:
        with pytest.raises(TransactionManagementError), transaction.atomic():
            DontSendEntry.objects.create(to_address="c@example.com", when_added=timezone.now())
            with pytest.raises(DatabaseError, match="poison refused"):
                mailer.send_mail("Poison", "Body", "from@example.com", ["a@example.com"])
            mailer.send_mail("After", "Body", "from@example.com", ["a@example.com"])
    finally:
        with connection.cursor() as cursor:
            for statement in DROP_POISON[connection.vendor]:
                cursor.execute(statement)

    assert not DontSendEntry.objects.exists() and not Message.objects.exists()


def test_a_site_listening_to_saves_hears_each_message_queued(settings):
    """With a receiver of the model's signals, the message is saved through the ORM (and the list read first)."""
    from django.db.models.signals import post_save

    heard = []

    def receiver(sender, instance, created, **kwargs):
        heard.append((instance.subject, created))

    post_save.connect(receiver, sender=Message)
    try:
        mailer.send_mail("Heard", "Body", "from@example.com", ["a@example.com"])
    finally:
        post_save.disconnect(receiver, sender=Message)

    assert heard == [("Heard", True)]
    assert Message.objects.get().subject == "Heard"


@pytest.mark.parametrize("count", [5, 120, 500])
def test_bulk_queueing_costs_one_lookup_and_one_insert_per_batch(settings, count):
    settings.MAILER_MESSAGES_BATCH_SIZE = 50

    with CaptureQueriesContext(connection) as queries:
        assert DbBackend().send_messages(newsletter(count)) == count

    sql = statements(queries)
    assert len(dont_send_lookups(sql)) == 1
    assert len(inserts(sql)) == math.ceil(count / 50)
    assert len(sql) == 1 + math.ceil(count / 50), "no statement per message"
    assert Message.objects.count() == count


def test_send_mass_mail_queues_in_bulk_too(settings):
    settings.MAILER_MESSAGES_BATCH_SIZE = 50  # 600 parameters: below SQLite's limit with Django 5.2
    datatuple = [(f"Issue {n}", "Body", "news@example.com", [f"reader{n}@example.com"]) for n in range(300)]

    with CaptureQueriesContext(connection) as queries:
        assert mailer.send_mass_mail(datatuple) == 300

    sql = statements(queries)
    assert len(dont_send_lookups(sql)) == 1 and len(inserts(sql)) == 6 and len(sql) == 7, sql


def test_by_default_each_insert_holds_many_messages():
    """Without the setting, as many rows an INSERT as the database takes (Django splits where SQLite needs it)."""
    with CaptureQueriesContext(connection) as queries:
        DbBackend().send_messages(newsletter(500))

    sql = statements(queries)
    assert len(dont_send_lookups(sql)) == 1
    assert 1 <= len(inserts(sql)) <= 10, "at least 50 messages an INSERT"
    assert len(sql) == 1 + len(inserts(sql))


def test_by_default_an_insert_holds_no_more_than_a_few_megabytes():
    """So that a batch of large attachments stays below MySQL's max_allowed_packet (4 MB on MySQL 5.7)."""
    emails = newsletter(8)
    for email in emails:
        email.attach("report.pdf", os.urandom(600_000), "application/pdf")  # 800,000 characters stored

    with CaptureQueriesContext(connection) as queries:
        assert DbBackend().send_messages(emails) == 8

    assert len(inserts(statements(queries))) >= 8 * 800_000 // BATCH_DATA_SIZE + 1
    assert Message.objects.count() == 8


def test_listed_recipients_are_dropped_from_every_message_of_a_bulk_with_one_lookup():
    now = timezone.now()
    DontSendEntry.objects.bulk_create(
        DontSendEntry(to_address=f"Reader{n}@Example.com", when_added=now) for n in range(0, 200, 7)
    )
    emails = [
        EmailMessage(f"Issue {n}", "Body", "news@example.com", [f"reader{n}@example.com", "editor@example.com"])
        for n in range(200)
    ]

    with CaptureQueriesContext(connection) as queries:
        DbBackend().send_messages(emails)

    assert len(dont_send_lookups(statements(queries))) == 1
    for message in Message.objects.all():
        n = int(message.subject.split()[1])
        expected = ["editor@example.com"] if n % 7 == 0 else [f"reader{n}@example.com", "editor@example.com"]
        assert message.email.recipients() == expected, message.subject


# A trigger that refuses one row, so that the INSERT of a later batch fails in the database itself.
REFUSE_POISON = {
    "sqlite": [
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON mailer_message WHEN NEW.subject = 'Poison'"
        " BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN IF NEW.subject = 'Poison' THEN RAISE EXCEPTION 'poison refused'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON mailer_message FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ],
    "mysql": [
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON mailer_message FOR EACH ROW BEGIN"
        " IF NEW.subject = 'Poison' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poison refused'; END IF; END",
    ],
}
DROP_POISON = {
    "mysql": ["DROP TRIGGER refuse_poison"],
    "sqlite": ["DROP TRIGGER refuse_poison"],
    "postgresql": ["DROP TRIGGER refuse_poison ON mailer_message", "DROP FUNCTION refuse_poison()"],
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("batches", ["of the setting", "of the default size"])
def test_a_bulk_is_queued_whole_or_not_at_all(settings, batches):
    """The batches share one transaction: a failing INSERT takes back those before it, so a retry duplicates nothing."""
    if connection.vendor not in REFUSE_POISON:
        pytest.skip(f"no trigger written for {connection.vendor}")
    emails = newsletter(6)
    if batches == "of the setting":
        settings.MAILER_MESSAGES_BATCH_SIZE = 2
    else:
        for email in emails:  # a third of a batch each, once in base64
            email.attach("report.pdf", os.urandom(BATCH_DATA_SIZE // 4), "application/pdf")
    emails[4].subject = "Poison"
    with connection.cursor() as cursor:
        for statement in REFUSE_POISON[connection.vendor]:
            cursor.execute(statement)
    try:
        with pytest.raises(DatabaseError, match="poison refused"):
            DbBackend().send_messages(emails)
    finally:
        with connection.cursor() as cursor:
            for statement in DROP_POISON[connection.vendor]:
                cursor.execute(statement)

    assert Message.objects.count() == 0


def test_send_mass_mail_queues_nothing_when_one_tuple_is_bad():
    """As Django's send_mass_mail, which builds every message before sending any."""
    datatuple = [
        ("One", "Body", "news@example.com", ["a@example.com"]),
        ("Two", "Body", "news@example.com", ["not an address"]),
    ]
    with pytest.raises(ValueError, match=r"to\[0\]"):
        mailer.send_mass_mail(datatuple)
    assert Message.objects.count() == 0


def test_the_dont_send_lookup_is_split_where_the_database_limits_parameters(few_parameters):
    """A database that takes few parameters a query (SQLite takes 999 with Django 5.2): each part finds its own."""
    now = timezone.now()
    DontSendEntry.objects.bulk_create(
        DontSendEntry(to_address=f"reader{n}@example.com", when_added=now) for n in (3, 14, 24, 40)
    )

    with CaptureQueriesContext(connection) as queries:
        DbBackend().send_messages(
            [EmailMessage(f"Issue {n}", "Body", "news@example.com", [f"reader{n}@example.com", "editor@example.com"])
             for n in range(40 + 1)]
        )  # fmt: skip

    assert len(dont_send_lookups(statements(queries))) == 3  # 42 addresses, 20 a query
    dropped = {int(m.subject.split()[1]) for m in Message.objects.all() if m.recipients == "editor@example.com"}
    assert dropped == {3, 14, 24, 40}


def test_one_message_with_more_recipients_than_a_statement_takes_is_still_checked(few_parameters):
    """send_mail's one statement cannot carry them all: it reads the list in parts, as a bulk does."""
    DontSendEntry.objects.create(to_address="reader33@example.com", when_added=timezone.now())
    recipients = [f"reader{n}@example.com" for n in range(40)]

    mailer.send_mail("Many", "Body", "news@example.com", recipients)

    assert Message.objects.get().email.to == [r for r in recipients if r != "reader33@example.com"]


def test_an_address_no_database_can_take_is_left_out_of_the_lookup():
    """A lone surrogate (from a damaged row the engine reads) cannot be on the list, and no driver encodes it."""
    DontSendEntry.objects.create(to_address="blocked@example.com", when_added=timezone.now())

    found = DontSendEntry.objects.suppressed_addresses(["lone\ud800@example.com", "Blocked <BLOCKED@example.com>"])

    assert found == {"blocked@example.com"}


@pytest.fixture
def few_parameters(monkeypatch):
    """Make the database take 20 parameters a query (a message's row and a few more), as Django sees it; return 20.

    Django 6.1 reads SQLite's own limit, which is lowered for real, as a site
    can; elsewhere Django is told the lower number.
    """
    previous = None
    try:
        monkeypatch.setattr(connection.features, "max_query_params", 20)
    except AttributeError:  # a property reading SQLite's limit
        connection.ensure_connection()
        previous = connection.connection.setlimit(SQLITE_LIMIT_VARIABLE_NUMBER, 20)
    yield 20
    if previous is not None:
        connection.connection.setlimit(SQLITE_LIMIT_VARIABLE_NUMBER, previous)


def test_a_bulk_logs_the_skipped_recipients_of_the_messages_that_had_some_only(caplog):
    DontSendEntry.objects.create(to_address="reader1@example.com", when_added=timezone.now())
    emails = [
        EmailMessage(f"Issue {n}", "Body", "news@example.com", [f"reader{n}@example.com", "editor@example.com"])
        for n in range(3)
    ]

    with caplog.at_level("INFO", logger="mailer.models"):
        DbBackend().send_messages(emails)

    assert [r.getMessage() for r in caplog.records] == ["skipping 1 recipient(s) on the don't send list"]


def stored_row(message: Message) -> dict:
    """Every column of the row of ``message``, as read back, but the id and what differs by design between
    two queueings of one email (its Message-ID, its time and the copy of the Message-ID in its data)."""
    row = Message.objects.filter(pk=message.pk).values().get()
    del row["id"], row["message_id"], row["when_added"], row["message_data"]
    return row


@pytest.mark.parametrize("alias", [None, "partner"])
def test_the_quick_ways_in_write_what_the_orm_writes(alias):
    """send_mail's one statement and DbBackend's raw bulk INSERT leave out what they can (NULLs, defaults):
    the rows they write hold what ``Message.for_email(...).save()``, the ORM's way, writes."""
    email = EmailMessage("Subject", "Body", "Ann <from@example.com>", ["a@example.com"], cc=["c@example.com"])
    before = timezone.now()

    assert Message.queue(email, 1, alias=alias) is not None
    from mailer.backend import queue_in_bulk

    assert queue_in_bulk([email, email], 1, alias=alias) == 2
    by_orm = Message.for_email(email, 1)
    by_orm.mailer_alias = alias
    by_orm.save()

    expected = stored_row(by_orm)
    assert expected["mailer_alias"] == alias and expected["priority"] == 1 and expected["claimed_until"] is None
    rows = list(Message.objects.order_by("pk"))
    assert len(rows) == 4
    for message in rows:
        assert stored_row(message) == expected
        assert message.message_id and message.when_added >= before
        assert message.email.message().as_bytes().count(b"Subject: Subject") == 1
    assert len({message.message_id for message in rows}) == 4


class RoutesByPriority:
    """A site's router that writes high-priority mail elsewhere, telling it by the instance being saved."""

    def db_for_write(self, model, **hints):
        instance = hints.get("instance")
        if model is Message and instance is not None and instance.priority == 1:
            return "replica"
        return None


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_a_router_is_told_the_message_being_queued_as_the_orm_tells_it(settings):
    """django-mailer saved each message: a router deciding by ``hints["instance"]`` still sees it, whether the
    queueing takes the one statement or, with a listed recipient, the long way."""
    settings.DATABASE_ROUTERS = [RoutesByPriority()]
    DontSendEntry.objects.create(to_address="listed@example.com", when_added=timezone.now())

    assert Message.queue(EmailMessage("Urgent", "Body", "a@example.com", ["b@example.com"]), 1) == "replica"
    listed = EmailMessage("Urgent", "Body", "a@example.com", ["b@example.com", "listed@example.com"])
    assert Message.queue(listed, 1) == "replica"
    assert Message.queue(EmailMessage("Later", "Body", "a@example.com", ["b@example.com"]), 3) == "default"
