"""Hard cases found by attacking the engine: refusals that must not leak into other messages or repeat,
rows SQLite cannot return, a sent message that can never be recorded, a 421 at RCPT on a reused session.

Each test asserts what must hold; all use the real SMTP test server.
"""

import datetime
from unittest import mock

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

import mailer
from mailer import engine, unfinished
from mailer.models import PRIORITY_HIGH, PRIORITY_LOW, RESULT_DONT_SEND, Message, MessageLog

pytestmark = pytest.mark.django_db


def test_refusals_of_one_message_never_make_a_copy_of_the_next(deliver_to_smtp):
    """Django does not call sendmail for a message without recipients: the refusals of the one before stay."""
    deliver_to_smtp.reject_recipient("busy@example.com", "452 4.5.3 Too many recipients")
    mailer.send_mail(
        "First", "Body", "from@example.com", ["ok@example.com", "busy@example.com"], priority=PRIORITY_HIGH
    )
    # A message with no recipients, through the documented 'assign any EmailMessage to .email' route.
    m = Message.objects.create(priority=PRIORITY_LOW, message_data="")
    m.email = EmailMessage("PRIVATE second", "secret body 2", "from@example.com", [])
    m.save()

    copies = list(Message.objects.all())
    leaked = [c for c in copies if c.subject == "PRIVATE second" and "busy@example.com" in c.recipients]
    assert not leaked, "message 2 (no recipients) queued for message 1's refused recipient"


def test_a_recipient_refused_for_now_gets_a_copy_when_another_is_named_twice(deliver_to_smtp):
    """Bob is named twice, in two forms; Carol with a display name: each is matched by envelope address."""
    deliver_to_smtp.reject_recipient("bob@example.com", "450 4.2.1 Mailbox busy")
    deliver_to_smtp.reject_recipient("carol@example.com", "450 4.2.1 Mailbox busy")
    email = EmailMessage(
        "Board",
        "Body",
        "from@example.com",
        ["ok@example.com", "bob@example.com", "Carol <carol@example.com>"],
        cc=["Bob <bob@example.com>"],
    )
    Message.for_email(email).save()

    assert engine.send_all() == {"sent": 1}
    [copy] = Message.objects.all()
    assert "carol@example.com" in copy.recipients, "carol was refused for now but gets no copy"


def test_a_marked_message_that_can_never_be_recorded_stops_nothing_else(deliver_to_smtp):
    """A row-specific failure to delete (here a trigger; in life e.g. a PROTECT foreign key from a site model)."""
    mailer.send_mail("Stuck", "Body", "from@example.com", ["a@example.com"], priority=PRIORITY_HIGH)
    for n in range(3):
        mailer.send_mail(f"Good {n}", "Body", "from@example.com", [f"g{n}@example.com"])
    if connection.vendor != "sqlite":
        pytest.skip("trigger syntax for SQLite")
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TRIGGER keep_stuck BEFORE DELETE ON mailer_message WHEN old.subject = 'Stuck' "
            "BEGIN SELECT RAISE(ABORT, 'row-specific: cannot delete'); END;"
        )
    from unittest import mock

    with mock.patch("time.sleep"):
        with pytest.raises(engine.SentButNotRecorded):
            engine.send_all()
        for _ in range(3):
            engine.send_all()  # logs that the stuck message cannot be recorded, and sends the rest
    assert len(deliver_to_smtp.received) == 4, "the three good messages are sent"
    assert [m.subject for m in Message.objects.sent_but_not_recorded()] == ["Stuck"]  # never sent again


@pytest.mark.django_db(transaction=True)  # in autocommit, as the commands run: the errors end no transaction
def test_the_next_pass_of_a_process_marks_and_gives_back_what_a_database_outage_kept_it_from(deliver_to_smtp):
    """The database goes down after the claim: the pass can neither record nor mark what it sent, nor give back
    the claims it did not get to. Once it is back, the next pass of the same process (runmailer's) marks and
    records the sent ones, never sending them again, and sends the rest at once, not when their claims lapse."""
    if connection.vendor != "sqlite":
        pytest.skip("trigger syntax for SQLite")
    for n in range(5):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE outage (down INTEGER)")
        cursor.execute("INSERT INTO outage VALUES (1)")
        # Claiming still works; recording (its DELETE), marking and giving claims back fail.
        cursor.execute(
            "CREATE TRIGGER no_delete BEFORE DELETE ON mailer_message WHEN (SELECT down FROM outage) "
            "BEGIN SELECT RAISE(ABORT, 'the database is down'); END;"
        )
        cursor.execute(
            "CREATE TRIGGER no_mark BEFORE UPDATE ON mailer_message WHEN (SELECT down FROM outage) "
            "AND (new.claimed_until IS NULL OR new.claimed_by LIKE 'sent:%') "
            "BEGIN SELECT RAISE(ABORT, 'the database is down'); END;"
        )
    with mock.patch("time.sleep"), pytest.raises(engine.SentButNotRecorded):
        engine.send_all()
    sent_first = len(deliver_to_smtp.received)
    assert sent_first == 2  # sent, then recorded together: the record failed
    assert unfinished.pending()  # so runmailer makes a pass, though no message is due
    with connection.cursor() as cursor:
        cursor.execute("UPDATE outage SET down = 0")

    assert engine.send_all() == {"sent": 5 - sent_first}
    assert not unfinished.pending()

    arrived = sorted(str(r.message["Subject"]) for r in deliver_to_smtp.received)
    assert arrived == [f"Message {n}" for n in range(5)], "sent twice, or not at all"
    assert not Message.objects.exists()
    notes = sorted(MessageLog.objects.values_list("log_message", flat=True))
    assert notes == [""] * 3 + ["sent by an earlier pass, recorded late"] * 2


def test_a_marked_message_is_taken_by_one_worker_only_to_be_recorded():
    mailer.send_mail("Once", "Body", "from@example.com", ["a@example.com"])
    message = Message.objects.get()
    Message.objects.claim(message.pk, "tok", until=timezone.now() + datetime.timedelta(minutes=10))
    assert Message.objects.mark_sent(message.pk, "tok")
    # Two workers (two hosts, each with its own lock file) read the marked message at the same time.
    [a] = Message.objects.sent_but_not_recorded()
    [b] = Message.objects.sent_but_not_recorded()
    assert Message.objects.take_for_recording(a, "worker-a")
    assert not Message.objects.take_for_recording(b, "worker-b")


@pytest.mark.parametrize("name", ["Bob Smith", "Jöhn Dœ"])
def test_with_message_data_off_the_refusal_note_and_the_copy_name_nobody(settings, deliver_to_smtp, name):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    deliver_to_smtp.reject_recipient("bob@example.com", "450 4.2.1 <bob@example.com> Mailbox busy")
    mailer.send_mail("S", "Body", "from@example.com", ["ok@example.com", f"{name} <bob@example.com>"])
    engine.send_all()
    texts = [log.log_message for log in MessageLog.objects.all()]
    for t in texts:
        assert "bob" not in t.lower() and name.split()[0].lower() not in t.lower()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite")
def test_a_row_with_an_impossible_date_is_set_aside():
    mailer.send_mail("Bad date", "Body", "from@example.com", ["a@example.com"], priority=PRIORITY_HIGH)
    mailer.send_mail("Good", "Body", "from@example.com", ["b@example.com"])
    with connection.cursor() as cursor:
        cursor.execute("UPDATE mailer_message SET when_added = '2024-13-45 10:00:00' WHERE subject = 'Bad date'")
    from django.core import mail

    for _ in range(2):
        engine.send_all()
    assert len(mail.outbox) == 1


def test_a_message_without_recipients_is_done_and_never_copied(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("busy@example.com", "452 4.5.3 Too many recipients")
    mailer.send_mail(
        "First", "Body", "from@example.com", ["ok@example.com", "busy@example.com"], priority=PRIORITY_HIGH
    )
    m = Message.objects.create(priority=PRIORITY_LOW, message_data="")
    m.email = EmailMessage("PRIVATE second", "secret body 2", "from@example.com", [])
    m.save()
    engine.send_all()
    deliver_to_smtp.recorder.rcpt_replies.clear()
    call_command("retry_deferred")
    engine.send_all()
    got = [(r.rcpt_tos, r.message["Subject"]) for r in deliver_to_smtp.received]
    assert (["busy@example.com"], "PRIVATE second") not in got
    assert MessageLog.objects.get(subject_copy="PRIVATE second").result == RESULT_DONT_SEND


@pytest.mark.parametrize("limit", [2, 1])
def test_a_recipient_named_in_to_and_cc_gets_the_message_once_under_a_recipient_limit(deliver_to_smtp, limit):
    """A server taking ``limit`` recipients per message (452 beyond): no duplicate, no endless copies."""

    async def limited_rcpt(server, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    deliver_to_smtp.recorder.handle_RCPT = limited_rcpt
    mailer.send_mail("Hi", "Body", "from@example.com", ["a@example.com", "b@example.com"])
    message = Message.objects.get()
    email = message.email
    email.cc = ["a@example.com"]
    message.email = email
    message.save()

    for _ in range(5):
        engine.send_all()
        call_command("retry_deferred")

    envelopes = [r.rcpt_tos for r in deliver_to_smtp.received]
    assert sum(t.count("a@example.com") for t in envelopes) == 1
    assert sum(t.count("b@example.com") for t in envelopes) == 1
    assert Message.objects.count() == 0


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite")
@pytest.mark.parametrize("column", ["subject", "recipients", "message_id"])
def test_a_row_with_non_utf8_in_a_search_column_is_set_aside(column):
    mailer.send_mail("Bad", "Body", "from@example.com", ["a@example.com"], priority=PRIORITY_HIGH)
    mailer.send_mail("Good", "Body", "from@example.com", ["b@example.com"])
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE mailer_message SET {column} = CAST(X'80FF41' AS TEXT) WHERE subject = 'Bad'")
    from django.core import mail

    for _ in range(2):
        engine.send_all()
    assert len(mail.outbox) == 1


def test_a_421_at_rcpt_on_a_reused_session_opens_a_new_one(deliver_to_smtp):
    """Same server behaviour as messages_per_session, but the 421 comes at RCPT instead of MAIL."""
    recorder = deliver_to_smtp.recorder

    async def rcpt(server, session, envelope, address, rcpt_options):
        session.n = getattr(session, "n", 0) + 1
        if session.n > 2:
            recorder._hang_up(server)
            return "421 4.7.0 Too many messages in this session, closing connection"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    recorder.handle_RCPT = rcpt
    for n in range(5):
        mailer.send_mail(f"M{n}", "Body", "from@example.com", [f"t{n}@example.com"])
    counts = engine.send_all()
    assert counts == {"sent": 5}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sent_together", [1, 2])
def test_a_log_table_that_cannot_hold_the_subject_stops_nothing_on_mysql(deliver_to_smtp, sent_together):
    """MariaDB and MySQL report a character the column's character set lacks as an OperationalError, not a
    DataError: the log row is written without its copies all the same, and the queue goes on.
    """
    if connection.vendor != "mysql":
        pytest.skip("a character set of MariaDB's and MySQL's")
    with connection.cursor() as cursor:  # a log table made before utf8mb4 was the default
        cursor.execute("ALTER TABLE mailer_messagelog CONVERT TO CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci")
    try:
        for n in range(sent_together):
            mailer.send_mail(f"Party \N{PARTY POPPER} {n}", "Body", "from@example.com", [f"to{n}@example.com"])
        assert engine.send_all() == {"sent": sent_together}
        mailer.send_mail("Plain", "Body", "from@example.com", ["plain@example.com"])
        assert engine.send_all() == {"sent": 1}
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE mailer_messagelog CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")

    assert len(deliver_to_smtp.received) == sent_together + 1
    assert not Message.objects.exists()
    rows = list(MessageLog.objects.order_by("pk").values_list("subject_copy", "message_id"))
    assert len(rows) == sent_together + 1 and all(message_id for _subject, message_id in rows)
    assert [subject for subject, _message_id in rows] == [None] * sent_together + ["Plain"]
