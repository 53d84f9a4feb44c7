"""A pass claims and reads messages a few at a time, and can send over several connections at once.

What a site notices: few statements per message (so the queue drains at the
mail server's speed), a claim query the database answers from an index, and
with ``--connections N`` several messages in flight at once, each still sent
exactly once, within ``MAILER_EMAIL_MAX_BATCH`` and ``MAILER_EMAIL_THROTTLE``.
"""

import datetime
import logging
import threading
import time
from collections import Counter
from unittest import mock

import pytest
from django.core.mail import EmailMessage
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection, connections
from django.db.backends.signals import connection_created
from django.db.models.signals import post_save
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import mailer
from mailer import engine, recording
from mailer.exceptions import ConfigurationError
from mailer.models import (
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
    MessageLogManager,
    datetime_now,
    email_to_db,
)
from tests.conftest import deliver_through


def queue(count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])


def one_pass(**kwargs) -> Counter[str]:
    counts = engine.send_all(**kwargs)
    assert counts is not None, "the pass did not run"
    return counts


def statements(sql: list[str]) -> Counter[str]:
    """The statements of a pass by their first word, leaving out savepoints (the test's own transaction)."""
    words = (query.split(None, 1)[0].upper() for query in sql)
    return Counter(word for word in words if word not in {"SAVEPOINT", "RELEASE"})


@pytest.mark.django_db
def test_a_pass_records_two_messages_per_statement_and_claims_and_reads_per_batch(deliver_to_smtp):
    """Sending 60 messages costs, beyond what sending 30 costs, one INSERT (two log rows) and one DELETE
    per two messages, and a few batch queries (claim, read), not a handful of queries per message as before.
    """
    queue(30)
    with CaptureQueriesContext(connection) as thirty:
        assert one_pass()["sent"] == 30
    queue(60, start=30)
    with CaptureQueriesContext(connection) as sixty:
        assert one_pass()["sent"] == 60

    small = statements([query["sql"] for query in thirty.captured_queries])
    large = statements([query["sql"] for query in sixty.captured_queries])
    assert large["INSERT"] - small["INSERT"] == 15  # two log rows at a time
    assert large["DELETE"] - small["DELETE"] == 15  # two messages off the queue at a time
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 90
    per_batch = (large["SELECT"] + large["UPDATE"]) - (small["SELECT"] + small["UPDATE"])
    assert per_batch <= 10, (small, large)  # claims, reads, don't-send checks: per batch, not per message
    assert len(deliver_to_smtp.received) == 90


def statements_by_thread(run: list[tuple[str, str]], **patches) -> None:
    """One pass of 40 messages, noting (thread, first word) of every statement Django runs, on any connection."""

    def note(execute, sql, params, many, context):
        run.append((threading.current_thread().name, sql.split(None, 1)[0].upper()))
        return execute(sql, params, many, context)

    def watch(sender, connection, **kwargs):
        connection.execute_wrappers.append(note)

    connection_created.connect(watch)
    try:
        # Claims of a minute's sending: two batches (the first claim is CLAIM_BATCH_MIN), however slowly a
        # loaded machine sends, so that the statements below are counted for a known number of batches.
        with connection.execute_wrapper(note), mock.patch.object(engine, "CLAIM_SECONDS", 60):
            assert one_pass()["sent"] == 40
    finally:
        connection_created.disconnect(watch)


# The records are made on the server as statements, with the session that made each (a trigger notes it).
NOTE_RECORDING_SESSIONS = [
    "CREATE TABLE recording_sessions (pid integer)",
    """CREATE FUNCTION note_recording_session() RETURNS trigger AS $$ BEGIN
           INSERT INTO recording_sessions VALUES (pg_backend_pid()); RETURN NULL;
       END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER note_recording_session AFTER INSERT ON mailer_messagelog
       FOR EACH STATEMENT EXECUTE FUNCTION note_recording_session()""",
]
FORGET_RECORDING_SESSIONS = [
    "DROP TRIGGER note_recording_session ON mailer_messagelog",
    "DROP FUNCTION note_recording_session()",
    "DROP TABLE recording_sessions",
]


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_postgresql_records_each_message_in_one_statement_of_another_session(deliver_to_smtp):
    """On PostgreSQL the records are made on a connection of their own, one statement per message (the DELETE
    rides in the INSERT's WITH, in autocommit), sent while the next message goes out; the pass's own
    connection claims and reads per batch. Those statements go through libpq, not Django's cursor.
    """
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    queue(40)
    with connection.cursor() as cursor:
        for statement in NOTE_RECORDING_SESSIONS:
            cursor.execute(statement)
    run: list[tuple[str, str]] = []
    try:
        statements_by_thread(run)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid, COUNT(*) FROM recording_sessions GROUP BY pid")
            sessions = dict(cursor.fetchall())
    finally:
        with connection.cursor() as cursor:
            for statement in FORGET_RECORDING_SESSIONS:
                cursor.execute(statement)

    own_session = connection.connection.info.backend_pid
    records_elsewhere = sum(n for pid, n in sessions.items() if pid != own_session)
    assert records_elsewhere >= 30, sessions  # one statement each, on another session
    own = Counter(word for _thread, word in run)
    assert own["WITH"] == sessions.get(own_session, 0) <= 5, own  # the first few, two at a time
    assert sum(n for word, n in own.items() if word != "WITH") <= 12, own  # claims, reads: per batch
    assert {thread for thread, _word in run} == {threading.current_thread().name}  # no thread of its own
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 40 and not Message.objects.exists()
    assert len(deliver_to_smtp.received) == 40


@pytest.mark.django_db(transaction=True)
def test_the_postgresql_recorder_has_one_record_at_a_time_in_flight():
    """A record is handed over and left to run, but the next waits for it: at most two messages are ever sent
    and not recorded (the one being recorded and the one just sent).
    """
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    queue(3)
    first, second, third = Message.objects.order_by("pk")
    recorder = recording.recorder_for("default")
    assert isinstance(recorder, recording.OverlappingRecorder)
    try:
        recorder.record(first, "")
        assert recorder.pending() == [first]
        recorder.record(second, "")
        assert not Message.objects.filter(pk=first.pk).exists()  # recorded before the second was handed over
        assert recorder.pending() == [second]
        recorder.record(third, "")
    finally:
        recorder.close()
    assert recorder.pending() == [] and not Message.objects.exists()
    assert sorted(MessageLog.objects.values_list("subject_copy", flat=True)) == ["Message 0", "Message 1", "Message 2"]


def on_a_thread(work) -> None:
    """Run ``work`` on a thread of its own, with a database connection of its own, and wait for it: beside the
    pass's connection, or from the mail server's thread (asynchronous, where Django refuses database work).
    """

    def run() -> None:
        try:
            work()
        finally:
            connections["default"].close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def end_session(pid: int) -> None:
    """End the database session ``pid``, as a server restart would."""

    def end() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    on_a_thread(end)


@pytest.mark.parametrize("pass_connection", ["works", "broke too"])
@pytest.mark.django_db(transaction=True)
def test_a_record_whose_reply_is_lost_after_its_commit_is_not_made_twice(pass_connection):
    """The connection breaks after the server committed a record and before its reply arrived (a network
    failure, simulated: a server ending a session first sends the replies it owes). The pass makes the record
    again on its own connection (reconnecting if that broke too), which logs nothing twice: the statement logs
    only a message it takes off the queue. The next record is made there too.
    """
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    queue(2)
    first, second = Message.objects.order_by("pk")
    collect = recording.OverlappingRecorder._collect

    def commit_then_lose_the_reply(recorder):
        collect(recorder)
        if pass_connection == "broke too":
            end_session(connection.connection.info.backend_pid)
        raise OperationalError("server closed the connection unexpectedly")

    recorder = recording.recorder_for("default")
    with (
        mock.patch.object(recording.OverlappingRecorder, "_collect", commit_then_lose_the_reply),
        mock.patch("mailer.recording.time.sleep"),
    ):
        recorder.record(first, "")
        recorder.record(second, "")
        recorder.close()
    assert sorted(MessageLog.objects.values_list("subject_copy", flat=True)) == ["Message 0", "Message 1"]
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_where_the_site_listens_to_log_rows_being_saved_the_orm_records_on_a_thread():
    """Its receivers run for each record, while the next message goes out."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's")
    queue(2)
    saved: list[str] = []

    def note(sender, instance, **kwargs):
        saved.append(instance.subject_copy)

    post_save.connect(note, sender=MessageLog)
    try:
        recorder = recording.recorder_for("default")
        assert isinstance(recorder, recording.Recorder)
        for message in Message.objects.order_by("pk"):
            recorder.record(message, "")
        recorder.close()
    finally:
        post_save.disconnect(note, sender=MessageLog)
    assert saved == ["Message 0", "Message 1"] and not Message.objects.exists()


class DeletingSMTPBackend(SMTPBackend):
    """Django's SMTP backend; the message whose subject is ``deleted`` is deleted from the queue as it goes out."""

    deleted = ""

    def send_messages(self, email_messages):
        for email in email_messages:
            if email.subject == self.deleted:
                Message.objects.filter(subject_copy=email.subject).delete()
        return super().send_messages(email_messages)


@pytest.mark.parametrize("deleted", ["Message 1", "Message 15"])  # recorded on the pass's connection; aside
@pytest.mark.django_db(transaction=True)
def test_a_message_deleted_from_the_queue_while_it_was_sent_is_still_logged(deliver_to_smtp, settings, deleted):
    """Someone deletes it in the admin while the mail server takes it: it went out, so it has its log row."""
    deliver_through(settings, "tests.test_batches.DeletingSMTPBackend")
    DeletingSMTPBackend.deleted = deleted
    queue(20)

    assert one_pass()["sent"] == 20

    assert sorted(received.message["Subject"] for received in deliver_to_smtp.received) == sorted(
        f"Message {n}" for n in range(20)
    )
    logged = sorted(MessageLog.objects.filter(result=RESULT_SUCCESS).values_list("subject_copy", flat=True))
    assert logged == sorted(f"Message {n}" for n in range(20)) and not Message.objects.exists()


@pytest.fixture
def handed_over(monkeypatch):
    """The sizes of the statements PostgreSQL's recorder hands over (skips the test elsewhere)."""
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    sizes: list[int] = []
    send = recording.OverlappingRecorder._send

    def spy(self, query: bytes) -> None:
        sizes.append(len(query))
        send(self, query)

    monkeypatch.setattr(recording.OverlappingRecorder, "_send", spy)
    # The pass records aside once it holds RECORD_ASIDE_FROM messages: from its first claim, however slowly a
    # loaded machine sends (later claims are sized by the pace of the last).
    monkeypatch.setattr(engine, "CLAIM_BATCH_MIN", 2 * recording.RECORD_ASIDE_FROM)
    return sizes


COPIED = ("message_id", "message_data", "subject_copy", "from_email", "recipients", "priority", "when_added")


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_copies_the_log_row_from_the_queue_row_rather_than_sending_the_message_back(
    deliver_to_smtp, handed_over
):
    """The server holds the message already: a record names its row, however large the message."""
    queue(20)
    mailer.send_mail("Large", "x" * 2_000_000, "from@example.com", ["to@example.com"])
    queued = set(Message.objects.values_list(*COPIED))

    assert one_pass()["sent"] == 21

    assert set(MessageLog.objects.values_list(*COPIED)) == queued
    assert len(handed_over) >= 10 and max(handed_over) < 2_000, handed_over


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_copies_no_message_data_where_the_site_keeps_none(deliver_to_smtp, settings, handed_over):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    queue(20)
    message_ids = set(Message.objects.values_list("message_id", flat=True))

    assert one_pass()["sent"] == 20

    assert len(handed_over) >= 10
    copies = set(MessageLog.objects.values_list("message_data", "subject_copy", "from_email", "recipients"))
    assert copies == {(None, None, None, None)}
    assert set(MessageLog.objects.values_list("message_id", flat=True)) == message_ids


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_logs_a_message_the_backend_changed_as_it_left(deliver_to_smtp, settings, handed_over):
    """Its queue row no longer holds what went out: the record carries the message as the backend left it."""
    from tests.test_upstream_compat import StampingBackend

    deliver_through(settings, f"{StampingBackend.__module__}.{StampingBackend.__qualname__}")
    queue(20)

    assert one_pass()["sent"] == 20

    assert len(handed_over) >= 10
    stamps = [log.email.extra_headers.get("X-Relay-Ticket") for log in MessageLog.objects.all()]
    assert stamps == ["T-1"] * 20


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_logs_each_message_once_where_a_trigger_moves_log_rows_elsewhere(
    deliver_to_smtp, handed_over
):
    """A log partitioned the old way: a trigger puts each row in a child table, and the INSERT reports none."""
    statements = [
        "CREATE TABLE mailer_messagelog_old_style_part () INHERITS (mailer_messagelog)",
        "CREATE FUNCTION mailer_messagelog_to_part() RETURNS trigger AS $$ BEGIN "
        "INSERT INTO mailer_messagelog_old_style_part VALUES (NEW.*); RETURN NULL; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER mailer_messagelog_to_part BEFORE INSERT ON mailer_messagelog "
        "FOR EACH ROW EXECUTE FUNCTION mailer_messagelog_to_part()",
    ]
    queue(20)
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    try:
        assert one_pass()["sent"] == 20
        logged = sorted(MessageLog.objects.values_list("subject_copy", flat=True))
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE mailer_messagelog_old_style_part")
            cursor.execute("DROP TRIGGER mailer_messagelog_to_part ON mailer_messagelog")
            cursor.execute("DROP FUNCTION mailer_messagelog_to_part()")
    assert len(handed_over) >= 10
    assert logged == sorted(f"Message {n}" for n in range(20))


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_logs_the_priority_a_message_was_sent_with(deliver_to_smtp, settings, handed_over):
    """Someone defers the message in the admin while the mail server takes it: it went out at its priority."""
    deliver_through(settings, "tests.test_batches.DeferringSMTPBackend")
    queue(20)

    assert one_pass()["sent"] == 20

    assert len(handed_over) >= 10
    assert set(MessageLog.objects.values_list("priority", flat=True)) == {PRIORITY_MEDIUM}


class DeferringSMTPBackend(SMTPBackend):
    """Django's SMTP backend; "Message 15" is deferred in the queue (as the admin's action does) as it goes out."""

    def send_messages(self, email_messages):
        for email in email_messages:
            if email.subject == "Message 15":
                Message.objects.get(subject_copy=email.subject).defer()
        return super().send_messages(email_messages)


@pytest.mark.django_db(transaction=True)
def test_postgresqls_recorder_logs_message_data_assigned_since_the_message_was_read():
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    mailer.send_mail("Queued", "Body", "from@example.com", ["to@example.com"])
    message = Message.objects.get()
    message.message_data = email_to_db(EmailMessage("Changed", "Body", "f@example.com", ["t@example.com"]))

    recorder = recording.recorder_for("default")
    recorder.record(message, "")
    recorder.close()

    assert MessageLog.objects.get().email.subject == "Changed"


@pytest.mark.parametrize("deleted", ["Large 1", "Large 15"])  # recorded on the pass's connection; aside
@pytest.mark.django_db(transaction=True)
def test_a_large_message_deleted_from_the_queue_while_it_was_sent_is_logged_without_its_data(
    deliver_to_smtp, settings, deleted
):
    """The pass let go of its data while it was sent (it is large), and the row is gone: its copies are logged."""
    deliver_through(settings, "tests.test_batches.DeletingSMTPBackend")
    DeletingSMTPBackend.deleted = deleted
    for n in range(20):
        body = "x" * 2_000_000 if f"Large {n}" == deleted else "Body"
        mailer.send_mail(
            f"Large {n}" if f"Large {n}" == deleted else f"Message {n}", body, "f@example.com", ["t@example.com"]
        )

    assert one_pass()["sent"] == 20

    assert MessageLog.objects.count() == 20 and not Message.objects.exists()
    log = MessageLog.objects.get(subject_copy=deleted)
    assert (log.result, log.message_data, log.recipients) == (RESULT_SUCCESS, None, "t@example.com")


@pytest.mark.django_db(transaction=True)
def test_a_lost_reply_to_the_record_of_a_large_message_ends_nothing(deliver_to_smtp, handed_over):
    """The record of a message whose data the pass let go of commits, its reply is lost: it is logged once."""
    queue(12)
    mailer.send_mail("Large", "x" * 2_000_000, "from@example.com", ["to@example.com"])
    queue(8, start=12)
    collect = recording.OverlappingRecorder._collect

    def lose_the_reply_to_the_large_ones(recorder):
        taken = collect(recorder)
        if recorder._sent[0].subject_copy == "Large":
            raise OperationalError("server closed the connection unexpectedly")
        return taken

    with mock.patch.object(recording.OverlappingRecorder, "_collect", lose_the_reply_to_the_large_ones):
        assert one_pass()["sent"] == 21

    assert sorted(MessageLog.objects.values_list("subject_copy", flat=True)) == sorted(
        ["Large", *(f"Message {n}" for n in range(20))]
    )
    assert not Message.objects.exists()


def queue_with_one_large(subject: str, at: int) -> None:
    for n in range(20):
        mailer.send_mail(
            subject if n == at else f"Message {n}",
            "x" * 2_000_000 if n == at else "Body",
            "from@example.com",
            ["to@example.com"],
        )


@pytest.mark.django_db(transaction=True)
def test_a_large_message_without_a_message_id_column_deleted_while_it_was_sent_is_logged(deliver_to_smtp, settings):
    """Queued by django-mailer 2.3.2 during the upgrade (its Message-ID only in its data): recorded aside."""
    deliver_through(settings, "tests.test_batches.DeletingSMTPBackend")
    DeletingSMTPBackend.deleted = "Large"
    queue_with_one_large("Large", at=15)
    Message.objects.update(message_id=None)

    assert one_pass()["sent"] == 20

    assert MessageLog.objects.filter(subject_copy="Large").count() == 1 and MessageLog.objects.count() == 20


@pytest.mark.django_db(transaction=True)
def test_a_record_made_again_after_its_reply_was_lost_logs_nothing_twice_on_every_database(deliver_to_smtp):
    """The first record of two messages commits and its reply is lost: the pass makes it again, logging none."""
    queue_with_one_large("Large", at=1)  # recorded with "Message 0", on the pass's connection
    record = MessageLogManager.log_and_delete
    lost: list[bool] = []

    def commit_then_lose_the_reply(self, rows, message_pks, *, again=False):
        record(self, rows, message_pks, again=again)
        if not lost:
            lost.append(again)
            raise OperationalError("server closed the connection unexpectedly")

    with mock.patch.object(MessageLogManager, "log_and_delete", commit_then_lose_the_reply):
        assert one_pass()["sent"] == 20

    assert lost == [False]
    logged = Counter(MessageLog.objects.values_list("subject_copy", flat=True))
    assert logged == Counter(["Large", *(f"Message {n}" for n in range(20) if n != 1)])


@pytest.mark.django_db
def test_reading_a_large_message_given_its_message_id_then_lets_go_of_its_data():
    email = EmailMessage("Large", "x" * 2_000_000, "from@example.com", ["to@example.com"])
    Message(message_data=email_to_db(email)).save()  # no Message-ID: the engine gives it one as it reads it
    message = Message.objects.get()

    engine._read_email(message)

    assert "message_data" not in message.__dict__
    assert not [name for name, value in vars(message).items() if isinstance(value, str) and len(value) > 1_000_000]


@pytest.mark.django_db(transaction=True)
def test_the_record_of_a_message_larger_than_the_sockets_buffers_is_handed_over_whole():
    """A 30 MB message (a 25 MB attachment, encoded) that the backend changed, so that its record carries it:
    the record does not fit the socket's buffers at once.
    """
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    mailer.send_mail("Large", "x" * 30_000_000, "from@example.com", ["to@example.com"])
    queue(1)
    large, small = Message.objects.order_by("pk")
    large.email = large.email  # as the engine stores what a backend changed
    done = threading.Event()

    def record() -> None:  # on a thread, so that a hang fails the test rather than stopping the run
        try:
            recorder = recording.recorder_for("default")
            recorder.record(large, "")
            recorder.record(small, "")
            recorder.close()
            done.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert done.is_set(), "the record hangs"
    assert sorted(MessageLog.objects.values_list("subject_copy", flat=True)) == ["Large", "Message 0"]
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_when_the_recorders_session_ends_the_pass_records_on_its_own_and_each_message_once(deliver_to_smtp, caplog):
    """The server ends every session but the pass's while the 20th message arrives (as a restart would, for
    a connection): the record in flight and the later ones are made on the pass's connection, each once.
    """
    if connection.vendor != "postgresql" or not recording._psycopg3():
        pytest.skip("PostgreSQL's, through psycopg 3")
    queue(40)
    connection.ensure_connection()
    own_session = connection.connection.info.backend_pid

    ended: list[bool] = []

    def end_other_sessions() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid NOT IN (pg_backend_pid(), %s) AND backend_type = 'client backend'",
                [own_session],
            )
            ended.extend(done for (done,) in cursor.fetchall())

    def on_message(received):
        if received.message["Subject"] == "Message 19":
            on_a_thread(end_other_sessions)

    deliver_to_smtp.on_message(on_message)
    with mock.patch("mailer.recording.time.sleep"):
        assert one_pass()["sent"] == 40

    assert ended and all(ended)  # the recorder's session
    assert "recording on the sending connection from now on" in caplog.text
    sent = [received.message["Subject"] for received in deliver_to_smtp.received]
    assert sorted(sent) == sorted(f"Message {n}" for n in range(40))
    logged = list(MessageLog.objects.values_list("subject_copy", flat=True))
    assert sorted(logged) == sorted(sent) and not Message.objects.exists()  # one log row each


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_mariadb_records_each_message_on_a_thread_while_the_next_goes_out(deliver_to_smtp):
    """On MariaDB and MySQL the records are made on a thread's connection, one message at a time, so that
    their commits overlap the sending; the pass's own connection claims and reads per batch.
    """
    if connection.vendor != "mysql":
        pytest.skip("MariaDB's")
    queue(40)
    run: list[tuple[str, str]] = []
    statements_by_thread(run)

    recorder = Counter(word for thread, word in run if thread == "mailer-recorder")
    own = Counter(word for thread, word in run if thread != "mailer-recorder")
    assert recorder["INSERT"] == recorder["DELETE"] >= 30, recorder  # with BEGIN and COMMIT
    # The first few, sent before the pass knew how many it would send, are recorded two at a time on its own.
    records = ("INSERT", "DELETE", "BEGIN", "COMMIT")
    assert sum(n for word, n in own.items() if word not in records) <= 12, own  # claims, reads: per batch
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 40 and not Message.objects.exists()
    assert len(deliver_to_smtp.received) == 40


@pytest.mark.django_db
def test_a_message_that_failed_is_not_claimed_again_in_the_same_pass(deliver_to_smtp, settings):
    """The batch after a failure does not pick the failed message up again (it keeps the pass's token)."""
    settings.MAILER_RETRY_BACKOFF = 0.001  # stays in the queue, due again at once
    deliver_to_smtp.reject_recipient("to0@example.com", "451 4.3.0 Try again later")
    queue(12)

    counts = one_pass()

    assert (counts["sent"], counts["deferred"]) == (11, 1)
    assert Message.objects.get().retry_count == 1  # tried once in this pass, not once per batch


@pytest.mark.django_db(transaction=True)
def test_the_claim_query_walks_the_sending_order_index_on_postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("the query plan of PostgreSQL")
    Message.objects.bulk_create(
        Message(message_data="{}", priority=priority) for priority in [1, 2, 3, 4] * 2500 for _ in range(1)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE mailer_message")
    now = datetime_now()
    candidates = engine.prioritize(None).due(now).claimable(now).exclude(claimed_by="token")
    with CaptureQueriesContext(connection) as queries:
        claimed = candidates.claim_batch("token", now, 10)
    assert len(claimed) == 10
    assert [pk for pk, _size in claimed] == sorted(pk for pk, _size in claimed)  # in sending order
    # One statement, one round trip: the UPDATE picks its rows with SELECT ... FOR UPDATE SKIP LOCKED.
    [claim] = [query["sql"] for query in queries.captured_queries]
    assert claim.startswith("UPDATE") and "FOR UPDATE SKIP LOCKED" in claim, claim
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + claim)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "mailer_message_sending_order" in plan, plan
    assert "Sort" not in plan, plan  # the index gives the order: the queue is not sorted to find 10


@pytest.mark.django_db(transaction=True)
def test_the_claims_index_holds_claimed_messages_only_and_serves_the_look_for_them():
    """Queueing writes no entry in it (PostgreSQL, SQLite); the queries that find claims still use it."""
    Message.objects.bulk_create(Message(message_data="{}") for _ in range(3000))
    now = datetime_now()
    claimed = Message.objects.order_by("pk")[:10].claim_batch("token", now + datetime.timedelta(minutes=5), 10)
    assert len(claimed) == 10
    claims = Message.objects.filter(claimed_until__gt=now)
    looks = {"claims": claims, "sent but not recorded": Message.objects.sent_but_not_recorded()}
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'mailer_message_claims'")
            [[definition]] = cursor.fetchall()
            assert definition.endswith("WHERE (claimed_until IS NOT NULL)"), definition
            cursor.execute("ANALYZE mailer_message")
            cursor.execute("SET enable_seqscan = off")  # the plan a large queue gets: the index, if usable
            explain = "EXPLAIN "
        elif connection.vendor == "sqlite":
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'mailer_message_claims'")
            [[definition]] = cursor.fetchall()
            assert definition.endswith('WHERE "claimed_until" IS NOT NULL'), definition
            explain = "EXPLAIN QUERY PLAN "
        else:  # MariaDB and MySQL: no partial indexes, so the whole column is indexed
            cursor.execute("SHOW INDEX FROM mailer_message WHERE Key_name = 'mailer_message_claims'")
            assert len(cursor.fetchall()) == 1
            explain = "EXPLAIN "
        try:
            for name, look in looks.items():
                sql, params = look.query.sql_with_params()
                cursor.execute(explain + sql, params)
                plan = str(cursor.fetchall())
                assert "mailer_message_claims" in plan, (name, plan)
        finally:
            if connection.vendor == "postgresql":
                cursor.execute("RESET enable_seqscan")
    assert claims.count() == 10


@pytest.mark.django_db(transaction=True)
def test_a_batch_is_claimed_in_sending_order():
    """Outside a transaction PostgreSQL claims in one UPDATE ... RETURNING, which keeps no order of its own."""
    low, high, medium = (Message(message_data=f"{{}}{n}", priority=priority) for n, priority in enumerate([3, 1, 2]))
    for message in (low, high, medium):
        message.save()
    now = datetime_now()

    claimed = engine.prioritize(None).due(now).claimable(now).claim_batch("token", now, 10)

    assert claimed == [(high.pk, 3), (medium.pk, 3), (low.pk, 3)]
    assert set(Message.objects.values_list("claimed_by", flat=True)) == {"token"}


class ReadsFromAReplica:
    """A router that sends reads to a replica (an alias this test project lacks) and writes to "default"."""

    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        return "default"


@pytest.mark.django_db
def test_a_claim_goes_to_the_database_that_takes_writes(settings):
    """A claim writes: with reads routed to a replica, claiming there would fail (or claim on a copy)."""
    queue(3)
    settings.DATABASE_ROUTERS = [ReadsFromAReplica()]
    now = datetime_now()

    claimed = engine.prioritize(None).due(now).claimable(now).claim_batch("token", now, 10)

    settings.DATABASE_ROUTERS = []
    assert len(claimed) == 3
    assert set(Message.objects.values_list("claimed_by", flat=True)) == {"token"}


# Several delivery connections ----------------------------------------------------------------------


def several_connections_possible() -> None:
    if connection.vendor == "sqlite":
        pytest.skip("the test database is in memory here; tests/test_many_senders.py uses a file, in real processes")


@pytest.mark.django_db(transaction=True)
def test_four_connections_send_each_message_exactly_once_side_by_side(deliver_to_smtp):
    several_connections_possible()
    deliver_to_smtp.delay_each_message(0.02)
    queue(40)

    counts = one_pass(connections=4)

    assert counts["sent"] == 40
    ids = Counter(received.message["Message-ID"] for received in deliver_to_smtp.received)
    assert len(ids) == 40 and set(ids.values()) == {1}
    assert not Message.objects.exists()
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 40
    assert deliver_to_smtp.connections == 4  # one session each, kept for the whole pass
    sessions = Counter(received.session for received in deliver_to_smtp.received)
    assert len(sessions) == 4 and min(sessions.values()) >= 4, sessions  # they shared the work


@pytest.mark.django_db(transaction=True)
def test_max_batch_counts_the_messages_of_every_connection(deliver_to_smtp, settings):
    several_connections_possible()
    settings.MAILER_EMAIL_MAX_BATCH = 7
    deliver_to_smtp.delay_each_message(0.02)
    queue(30)

    counts = one_pass(connections=4)

    assert counts["sent"] == 7
    assert len(deliver_to_smtp.received) == 7
    assert Message.objects.count() == 23
    assert not Message.objects.filter(claimed_until__isnull=False).exists()  # the rest given back


@pytest.mark.django_db(transaction=True)
def test_the_throttle_spaces_all_connections_together(deliver_to_smtp, settings):
    """MAILER_EMAIL_THROTTLE is a rate for the whole pass: four connections do not send four times as often."""
    several_connections_possible()
    settings.MAILER_EMAIL_THROTTLE = 0.25
    queue(6)

    started = time.monotonic()
    counts = one_pass(connections=4)
    took = time.monotonic() - started

    assert counts["sent"] == 6
    assert took >= 5 * 0.25  # six messages: at least five intervals between them
    arrivals = sorted(received.received_at for received in deliver_to_smtp.received)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) >= 0.2, gaps  # the first messages of the four connections too


@pytest.mark.django_db(transaction=True)
def test_connections_the_database_refuses_step_aside_and_the_others_send(deliver_to_smtp, caplog):
    """A role's or server's limit of connections reached at a peak: fewer senders, not a stalled queue."""
    if connection.vendor != "postgresql":
        pytest.skip("a database's own limit of connections: PostgreSQL's ALTER DATABASE")
    name = connection.ops.quote_name(connection.settings_dict["NAME"])
    queue(12)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER DATABASE {name} CONNECTION LIMIT 3")  # this one and two senders
    try:
        with caplog.at_level(logging.WARNING, logger="mailer.engine"):
            counts = one_pass(connections=4)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {name} CONNECTION LIMIT -1")

    assert counts["sent"] == 12
    assert caplog.text.count("a sender could not connect to the database") == 2
    assert len({received.message["Message-ID"] for received in deliver_to_smtp.received}) == 12


@pytest.mark.django_db
def test_inside_a_transaction_several_connections_fall_back_to_one(deliver_to_smtp, caplog):
    """Other threads cannot see rows this transaction has not committed: the pass says so and uses one."""
    queue(3)
    with caplog.at_level(logging.WARNING, logger="mailer.engine"):
        counts = one_pass(connections=3)
    assert counts["sent"] == 3
    assert "several delivery connections need a database outside a transaction; using one" in caplog.text


@pytest.mark.parametrize("value", [0, -1, "4", 2.5, True, 65, 10_000])
def test_a_bad_number_of_connections_is_refused_before_anything_is_sent(settings, value):
    settings.MAILER_DELIVERY_CONNECTIONS = value
    with pytest.raises(ConfigurationError, match="MAILER_DELIVERY_CONNECTIONS"):
        one_pass()


@pytest.mark.parametrize("command", ["send_mail", "runmailer"])
@pytest.mark.parametrize("value", ["0", "many"])
def test_the_connections_option_refuses_what_is_not_a_count(command, value):
    with pytest.raises(CommandError, match=f"--connections: must be a whole number, 1 or more, not '{value}'"):
        call_command(command, "--connections", value)


class SlowClaimCheckingBackend(LocmemBackend):
    """Takes 1.1 s over each message, then notes the claims of the queue that have run out meanwhile."""

    lapsed: list[int] = []

    def send_messages(self, messages):
        time.sleep(1.1)
        now = timezone.now()
        claimed = Message.objects.filter(claimed_by__isnull=False, claimed_until__isnull=False)
        self.lapsed.extend(claimed.filter(claimed_until__lt=now).values_list("pk", flat=True))
        return super().send_messages(messages)


@pytest.mark.slow
@pytest.mark.django_db
def test_claims_of_messages_sent_but_not_recorded_yet_are_kept_alive_too(settings):
    """A message waits for the next one to go out before it is recorded: its claim must not run out meanwhile,
    or another worker would send it again.
    """
    settings.MAILER_EMAIL_BACKEND = "tests.test_batches.SlowClaimCheckingBackend"
    settings.MAILER_CLAIM_TIMEOUT = 2
    SlowClaimCheckingBackend.lapsed.clear()
    queue(3)

    assert one_pass()["sent"] == 3

    assert SlowClaimCheckingBackend.lapsed == []
    assert not Message.objects.exists()


def leave_it_as_it_was(connection, message, exc):
    return None, "deferred"


@pytest.mark.django_db
def test_a_message_an_error_handler_leaves_as_it_was_is_not_left_claimed(deliver_to_smtp, settings):
    """A custom handler that neither defers nor reschedules it: the next pass must try it again, not wait
    MAILER_CLAIM_TIMEOUT.
    """
    settings.MAILER_ERROR_HANDLER = "tests.test_batches.leave_it_as_it_was"
    deliver_to_smtp.reject_recipient("to0@example.com", "451 4.3.0 Try again later")
    queue(1)

    assert one_pass()["deferred"] == 1
    assert Message.objects.get().claimed_until is None
    assert one_pass()["deferred"] == 1  # tried again at once


# Outside a transaction on PostgreSQL, the claim reads too -------------------------------------------


def claims_in_one_statement() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("only PostgreSQL's claim reads the rows it takes")


@pytest.mark.django_db(transaction=True)
def test_a_message_queued_alone_goes_out_after_one_statement(deliver_to_smtp):
    """What runmailer_pg does as a message is queued: the claim is the only statement before it goes out
    (no read of the row, of the don't-send list, of messages waiting to be recorded), which is how soon it
    arrives.
    """
    claims_in_one_statement()
    queue(1)
    database = connections["default"]  # the pass's connection, as the server's thread cannot name it
    before_sending: list[str] = []
    with CaptureQueriesContext(database) as queries:
        start = queries.initial_queries
        deliver_to_smtp.on_message(
            lambda message: before_sending.extend(query["sql"] for query in list(database.queries_log)[start:])
        )
        assert one_pass()["sent"] == 1

    assert len(deliver_to_smtp.received) == 1
    assert [sql.split(None, 1)[0] for sql in before_sending] == ["UPDATE"], before_sending


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_dont_send_list_still_keeps_mail_away(deliver_to_smtp):
    """The claim says whether the list is empty, to spare the look-up; when it is not, it is looked up."""
    mailer.send_mail("Kept", "Body", "from@example.com", ["listed@example.com"])
    mailer.send_mail("Partly kept", "Body", "from@example.com", ["listed@example.com", "to@example.com"])
    DontSendEntry.objects.create(to_address="Listed@example.com", when_added=timezone.now())

    counts = one_pass()

    assert (counts["sent"], counts["dont_send"]) == (1, 1)
    [received] = deliver_to_smtp.received
    assert received.rcpt_tos == ["to@example.com"]
    assert MessageLog.objects.filter(result=RESULT_DONT_SEND).count() == 1


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_messages_too_large_to_read_with_the_claim_are_read_after_it(deliver_to_smtp):
    """The claim brings back only the rows that keep a batch within READ_BYTES; the others are read on their own."""
    large = "A line of the large message.\n" * (engine.READ_BYTES // engine.CLAIM_BATCH_MIN // 20)
    mailer.send_mail("Large", large, "from@example.com", ["large@example.com"])
    queue(3)

    assert one_pass()["sent"] == 4

    bodies = {received.message["Subject"]: received.message.get_content() for received in deliver_to_smtp.received}
    assert bodies["Large"].replace("\r\n", "\n") == large
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_messages_sent_earlier_are_recorded_before_anything_is_sent(deliver_to_smtp):
    """A pass that sent a message and could not record it marked it: the next pass records it, and sends
    nothing while it cannot (the claim it made meanwhile is given back at once, not left to lapse).
    """
    queue(1)
    sent_earlier = Message.objects.get()
    assert Message.objects.claim(sent_earlier.pk, "an earlier pass", datetime_now() + datetime.timedelta(minutes=10))
    assert Message.objects.mark_sent(sent_earlier.pk, "an earlier pass")
    queue(1, start=1)

    cannot_record = mock.patch.object(MessageLog.objects, "row_for", side_effect=OperationalError("disk full"))
    with cannot_record, pytest.raises(OperationalError, match="disk full"):
        engine.send_all()
    assert deliver_to_smtp.received == []
    assert Message.objects.exclude(pk=sent_earlier.pk).get().claimed_until is None

    assert one_pass() == {"sent": 1}
    [received] = deliver_to_smtp.received
    assert received.message["Subject"] == "Message 1"
    assert list(MessageLog.objects.order_by("pk").values_list("log_message", flat=True)) == [
        "sent by an earlier pass, recorded late",
        "",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_pass_with_nothing_to_send_still_records_what_an_earlier_pass_sent(deliver_to_smtp):
    queue(1)
    sent_earlier = Message.objects.get()
    assert Message.objects.claim(sent_earlier.pk, "an earlier pass", datetime_now() + datetime.timedelta(minutes=10))
    assert Message.objects.mark_sent(sent_earlier.pk, "an earlier pass")

    assert one_pass() == {}

    assert deliver_to_smtp.received == [] and not Message.objects.exists()
    assert MessageLog.objects.get().log_message == "sent by an earlier pass, recorded late"


REFUSE_A_LOG_ROW = {
    "postgresql": [
        """CREATE FUNCTION refuse_a_log_row() RETURNS trigger AS $$ BEGIN
               IF NEW.subject = 'Message 20' THEN RAISE EXCEPTION 'the disk is full'; END IF; RETURN NEW;
           END $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER refuse_a_log_row BEFORE INSERT ON mailer_messagelog
           FOR EACH ROW EXECUTE FUNCTION refuse_a_log_row()""",
    ],
    "mysql": [
        """CREATE TRIGGER refuse_a_log_row BEFORE INSERT ON mailer_messagelog FOR EACH ROW
           IF NEW.subject = 'Message 20' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the disk is full'; END IF""",
    ],
}
ALLOW_LOG_ROWS = {
    "postgresql": ["DROP TRIGGER refuse_a_log_row ON mailer_messagelog", "DROP FUNCTION refuse_a_log_row()"],
    "mysql": ["DROP TRIGGER refuse_a_log_row"],
}


@pytest.mark.django_db(transaction=True)
def test_a_record_that_fails_on_the_recorders_connection_ends_the_pass_and_nothing_is_sent_twice(deliver_to_smtp):
    """The database refuses the log row of the 21st message (a trigger, as a full disk would): the pass ends
    with the error, that message and the one sent after it are marked as sent, the rest wait, and the next
    pass, once the database takes log rows again, records those two late and sends the others, each once.
    """
    if connection.vendor not in REFUSE_A_LOG_ROW:
        pytest.skip("a database server's")
    queue(40)
    with connection.cursor() as cursor:
        for statement in REFUSE_A_LOG_ROW[connection.vendor]:
            cursor.execute(statement)
    try:
        with mock.patch("mailer.recording.time.sleep"), pytest.raises(engine.SentButNotRecorded, match="disk is full"):
            engine.send_all()
    finally:
        with connection.cursor() as cursor:
            for statement in ALLOW_LOG_ROWS[connection.vendor]:
                cursor.execute(statement)

    sent = [received.message["Subject"] for received in deliver_to_smtp.received]
    assert sent == [f"Message {n}" for n in range(22)]  # the 22nd went out while the 21st was being recorded
    marked = sorted(message.subject for message in Message.objects.sent_but_not_recorded())
    assert marked == ["Message 20", "Message 21"]
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 20
    assert not Message.objects.exclude(subject_copy__in=marked).filter(claimed_until__isnull=False).exists()

    assert engine.send_all() == {"sent": 18}
    sent = [received.message["Subject"] for received in deliver_to_smtp.received]
    assert sorted(sent) == sorted(f"Message {n}" for n in range(40))  # each once
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 40 and not Message.objects.exists()
