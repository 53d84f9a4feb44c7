"""A pass over the queue: claims, limits, the don't-send list at send time, patch points."""

import base64
import datetime
import logging
import pickle
import smtplib
import time
from unittest import mock

import lockfile
import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.core.management import call_command
from django.db import DatabaseError, OperationalError, connection
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

import mailer
from mailer import engine
from mailer.codec import email_to_db
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
)
from tests.alarms import time_limit
from tests.locks import lock_is_free

pytestmark = pytest.mark.django_db


def queue(count=1, subject="Message"):
    for n in range(count):
        mailer.send_mail(f"{subject} {n}", "Body", "from@example.com", [f"to{n}@example.com"])


def test_an_empty_queryset_sends_nothing():
    queue(2)
    engine.send_all(Message.objects.none())
    assert mail.outbox == []
    assert Message.objects.count() == 2


def test_a_queryset_limits_the_pass_to_its_messages():
    queue(3)
    first = Message.objects.order_by("pk").first()
    engine.send_all(Message.objects.filter(pk=first.pk))
    assert [m.subject for m in mail.outbox] == ["Message 0"]
    assert Message.objects.count() == 2


def test_deferred_messages_wait_for_retry_deferred():
    queue(1)
    Message.objects.update(priority=PRIORITY_DEFERRED)
    engine.send_all()
    assert mail.outbox == []
    assert Message.objects.retry_deferred() == 1
    engine.send_all()
    assert len(mail.outbox) == 1
    assert MessageLog.objects.get().result == RESULT_SUCCESS


def test_a_message_claimed_by_another_worker_is_left_alone():
    queue(2)
    held = Message.objects.order_by("pk").first()
    assert Message.objects.claim(held.pk, "other-worker", until=timezone.now() + datetime.timedelta(minutes=5))

    engine.send_all()

    assert [m.subject for m in mail.outbox] == ["Message 1"]
    assert Message.objects.get().pk == held.pk


def test_a_lapsed_claim_is_taken_over():
    queue(1)
    crashed = Message.objects.get()
    assert Message.objects.claim(crashed.pk, "crashed-worker", until=timezone.now() - datetime.timedelta(seconds=1))

    engine.send_all()

    assert len(mail.outbox) == 1
    assert Message.objects.count() == 0


def test_claim_is_exclusive():
    queue(1)
    pk = Message.objects.get().pk
    until = timezone.now() + datetime.timedelta(minutes=5)
    assert Message.objects.claim(pk, "first", until=until)
    assert not Message.objects.claim(pk, "second", until=until)


def test_a_failed_message_is_tried_once_per_pass_even_if_still_selected(settings, deliver_to_smtp):
    """Deferred messages stay in Message.objects.all(): the pass must not go round and round on one."""
    settings.MAILER_EMAIL_MAX_DEFERRED = 5  # going round would end the pass here rather than hang it
    deliver_to_smtp.reject_recipient("to0@example.com", "451 4.3.0 Try again later")
    queue(1)

    counts = engine.send_all(Message.objects.all())

    assert counts is not None

    assert counts["deferred"] == 1
    assert deliver_to_smtp.connections == 1
    assert MessageLog.objects.filter(result=RESULT_FAILURE).count() == 1


FAILURES: list = []


def count_and_defer(connection, message, exc):
    FAILURES.append(exc)
    message.defer()
    return None, "deferred"


def test_max_batch_stops_the_pass(settings):
    settings.MAILER_EMAIL_MAX_BATCH = 2
    queue(5)
    engine.send_all()
    assert len(mail.outbox) == 2
    assert Message.objects.count() == 3


def test_max_deferred_stops_the_pass(settings, caplog, deliver_to_smtp):
    settings.MAILER_EMAIL_MAX_DEFERRED = 2
    for n in range(4):
        deliver_to_smtp.reject_recipient(f"to{n}@example.com")
    queue(4)
    with caplog.at_level(logging.WARNING, logger="mailer.engine"):
        engine.send_all()
    assert Message.objects.deferred().count() == 2
    assert Message.objects.non_deferred().count() == 2
    assert "EMAIL_MAX_DEFERRED (2) reached, stopping for this round" in caplog.text


def test_throttle_spaces_out_deliveries_whatever_their_outcome(settings, deliver_to_smtp):
    """The server sees the gaps: a pause after the sent message, one after the refused one, one after the last."""
    settings.MAILER_EMAIL_THROTTLE = 0.2
    deliver_to_smtp.reject_recipient("to1@example.com", "450 4.2.1 Mailbox busy")
    queue(3)

    started = time.monotonic()
    counts = engine.send_all()
    assert counts is not None
    elapsed = time.monotonic() - started

    assert (counts["sent"], counts["deferred"]) == (2, 1)
    first, third = deliver_to_smtp.received
    assert third.received_at - first.received_at >= 2 * 0.2
    assert elapsed >= 3 * 0.2


def test_without_a_throttle_messages_go_out_back_to_back(deliver_to_smtp):
    """The default, 0, does not pause at all."""
    queue(3)

    engine.send_all()

    first, _, third = deliver_to_smtp.received
    assert third.received_at - first.received_at < 0.5


def test_paused_sending_sends_nothing(settings):
    settings.MAILER_PAUSE_SEND = True
    queue(1)
    engine.send_all()
    assert mail.outbox == []
    assert Message.objects.count() == 1


class TestDontSendAtSendTime:
    def block(self, address):
        DontSendEntry.objects.create(to_address=address, when_added=timezone.now())

    def test_an_entry_added_after_queueing_still_takes_effect(self):
        mailer.send_mail("Hi", "", "f@example.com", ["keep@example.com", "late@example.com"])
        self.block("late@example.com")

        engine.send_all()

        [sent] = mail.outbox
        assert sent.to == ["keep@example.com"]

    def test_a_message_for_listed_recipients_only_is_logged_not_sent(self):
        self.block("blocked@example.com")
        mailer.send_mail("Blocked", "", "f@example.com", ["blocked@example.com"])

        engine.send_all()

        assert mail.outbox == []
        assert Message.objects.count() == 0
        log = MessageLog.objects.get()
        assert log.result == RESULT_DONT_SEND
        assert "blocked@example.com" in log.log_message

    @pytest.mark.parametrize("stored_as", ["django-mailer 2.3.2's pickle", "JSON"])
    def test_a_message_queued_without_recipients_is_logged_once_and_done(self, stored_as):
        """django-mailer 2.3.2 queued these (its don't-send list dropped every recipient, or mail_admins ran
        without ADMINS) and finished them without sending: after the switch they must not come back deferred
        after every retry_deferred."""
        email = EmailMessage("Nobody", "Body", "f@example.com", [])
        data = base64.encodebytes(pickle.dumps(email)).decode("ascii") if stored_as != "JSON" else email_to_db(email)
        Message.objects.create(message_data=data, priority=PRIORITY_HIGH)
        queue(1)

        assert engine.send_all() == {"sent": 1, "dont_send": 1}
        call_command("retry_deferred")
        assert engine.send_all() is not None

        assert len(mail.outbox) == 1
        assert Message.objects.count() == 0
        [log] = MessageLog.objects.filter(subject_copy="Nobody")
        assert (log.result, log.log_message) == (RESULT_DONT_SEND, "the message has no recipients: nothing to send")


def test_undecodable_messages_are_kept_deferred_with_the_reason(caplog):
    """django-mailer 2.x deleted them; a message is never lost, so it waits for a human."""
    Message.objects.create(message_data="not a message at all", priority=PRIORITY_HIGH)
    Message.objects.create(message_data='{"mailer": 99}', priority=PRIORITY_HIGH)
    Message.objects.create(message_data='{"mailer": 1, "value": ' + "[" * 100_000 + "]" * 100_000 + "}")
    wrong_type = EmailMessage("Bad", "", "f@example.com", ["t@example.com"])
    Message.objects.create(message_data=email_to_db(wrong_type).replace('"to":["t@example.com"]', '"to":5'))
    queue(1)  # behind them all
    with caplog.at_level(logging.WARNING, logger="mailer.engine"):
        engine.send_all()
    assert Message.objects.deferred().count() == 4
    reasons = sorted(MessageLog.objects.filter(result=RESULT_FAILURE).values_list("log_message", flat=True))
    assert "message data is damaged: to is not a list" in reasons
    assert "message data is neither JSON nor a django-mailer pickle" in reasons
    assert "message data is not in a format this version knows (mailer=99)" in reasons
    assert any("RecursionError" in reason for reason in reasons), reasons
    assert "message deferred due to failure in converting from DB" in caplog.text
    assert [m.subject for m in mail.outbox] == ["Message 0"]


class BuggyBackend(LocmemBackend):
    """A delivering backend with a bug that one message sets off."""

    def send_messages(self, messages):
        if any(message.subject == "Message 0" for message in messages):
            raise RuntimeError("bug")
        return super().send_messages(messages)


def test_an_unexpected_error_defers_its_message_and_the_pass_goes_on(settings):
    """Unlike 2.x, whose default handler raised it again and stopped every later pass on the same message."""
    settings.MAILER_EMAIL_BACKEND = "tests.test_engine.BuggyBackend"
    queue(2)

    counts = engine.send_all()

    assert counts is not None and (counts["sent"], counts["deferred"]) == (1, 1)
    assert [m.subject for m in mail.outbox] == ["Message 1"]
    failed = Message.objects.get(priority=PRIORITY_DEFERRED)
    assert failed.claimed_until is None and not failed.failed_permanently
    assert MessageLog.objects.get(result=RESULT_FAILURE).log_message == "RuntimeError: bug"


def test_a_configuration_error_leaves_messages_untouched_and_free(settings):
    settings.MAILER_EMAIL_BACKEND = "tests.no_such_module.EmailBackend"
    queue(1)
    with pytest.raises(ImportError, match="tests.no_such_module"):
        engine.send_all()
    message = Message.objects.get()
    assert message.priority != PRIORITY_DEFERRED and message.claimed_until is None
    assert MessageLog.objects.count() == 0


def test_a_custom_error_handler_is_used(settings, deliver_to_smtp):
    """It gets the real error and decides alone: the default handler would have written failure log rows."""
    settings.MAILER_ERROR_HANDLER = "tests.test_engine.count_and_defer"
    FAILURES.clear()
    deliver_to_smtp.reject_recipient("to0@example.com")
    deliver_to_smtp.reject_recipient("to1@example.com")
    queue(2)

    engine.send_all()

    assert [type(exc) for exc in FAILURES] == [smtplib.SMTPRecipientsRefused] * 2
    assert FAILURES[0].recipients == {"to0@example.com": (550, b"5.1.1 No such user")}
    assert Message.objects.deferred().count() == 2
    assert MessageLog.objects.count() == 0


def test_the_log_row_holds_the_message_as_the_backend_left_it():
    queue(1)
    engine.send_all()
    log = MessageLog.objects.get()
    assert log.email.subject == "Message 0"
    assert log.message_id == mail.outbox[0].extra_headers["Message-ID"]


def test_log_message_data_off_keeps_content_out_of_the_log(settings, caplog):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    mailer.send_mail("Secret subject", "Body", "f@example.com", ["secret@example.com"])
    with caplog.at_level(logging.DEBUG, logger="mailer"):
        engine.send_all()
    log = MessageLog.objects.get()
    assert log.message_data is None and log.message_id
    assert "Secret subject" not in caplog.text and "secret@example.com" not in caplog.text


def test_send_all_reports_what_it_did(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("to1@example.com", "550 5.1.1 No such user")
    deliver_to_smtp.reject_recipient("to2@example.com", "450 4.2.1 Mailbox busy")
    queue(4)
    counts = engine.send_all()
    assert counts is not None
    assert (counts["sent"], counts["deferred"], counts["failed"]) == (2, 1, 1)


class Stop(BaseException):
    """Raised by a patched function to end send_loop, which never returns by itself.

    Not an Exception: send_loop logs those and goes on.
    """


def stop(*args, **kwargs):
    raise Stop("stopped by the patch")


# What 2.x code patches (docs/engine.rst), what it is patched with, and what the pass or loop then does.
PATCH_POINTS = {
    "mailer.engine.prioritize": (lambda queryset=None: Message.objects.none(), "sends nothing"),
    "mailer.engine.acquire_lock": (lambda: (False, None), "sends nothing"),
    "mailer.engine.release_lock": (lambda lock: None, "keeps the lock"),
    "lockfile.FileLock": ("a lock another owner holds", "sends nothing"),
    "mailer.engine.logger": (logging.getLogger("tests.patched_logger"), "logs there"),
    "mailer.engine.send_all": (stop, "loop stops"),
    "time.sleep": (stop, "loop stops"),
}


@pytest.mark.parametrize("target", PATCH_POINTS)
def test_the_names_2x_code_patches_are_looked_up_when_called(settings, target, lock_path, hold_lock, caplog, tmp_path):
    """django-mailer 2.x sites patch these in their own tests: mock.patch is the subject here, and each must bite."""
    replacement, effect = PATCH_POINTS[target]
    if replacement == "a lock another owner holds":
        elsewhere = str(tmp_path / "elsewhere")
        hold_lock(elsewhere)
        real_file_lock = lockfile.FileLock
        replacement = lambda path: real_file_lock(elsewhere)  # noqa: E731
    if target != "time.sleep":
        queue(1)  # with nothing to send, send_loop goes to sleep
    settings.MAILER_EMPTY_QUEUE_SLEEP = 0.01

    with mock.patch(target, replacement), caplog.at_level(logging.INFO):
        if effect == "loop stops":
            with time_limit(5), pytest.raises(Stop, match="stopped by the patch"):
                engine.send_loop()
        else:
            engine.send_all()

    if effect in ("sends nothing", "loop stops"):
        assert mail.outbox == []
    elif effect == "keeps the lock":
        assert len(mail.outbox) == 1 and not lock_is_free(lock_path)
    else:
        assert {r.name for r in caplog.records if "1 sent;" in r.getMessage()} == {"tests.patched_logger"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor == "sqlite", reason="the test database is in memory: its connection stays open")
def test_after_a_failed_pass_the_loop_goes_on_with_new_database_connections(settings, monkeypatch):
    """What the error left on a connection goes with it (with psycopg's prepared statements, a statement prepared
    before a migration changed its table, which would fail the same way at every pass of a long-running worker).
    """
    connection.close()  # the next one is kept between passes, as with the CONN_MAX_AGE the docs recommend
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 600)
    queue(1)
    settings.MAILER_EMPTY_QUEUE_SLEEP = 0.01
    used = []

    def fail_then_stop(queryset=None):
        used.append(connection.connection)
        if len(used) == 1:
            raise DatabaseError("cached plan must not change result type")
        raise Stop("stopped by the patch")

    with mock.patch("mailer.engine.prioritize", fail_then_stop), time_limit(10), pytest.raises(Stop):
        engine.send_loop()

    assert len(used) == 2 and used[0] is not None and used[1] is not used[0]


def test_the_2x_module_constants_follow_the_settings(settings):
    """django-mailer 2.x froze them at import; here they show the settings as they are now."""
    settings.MAILER_EMPTY_QUEUE_SLEEP = 7
    settings.MAILER_LOCK_WAIT_TIMEOUT = 5
    settings.MAILER_LOCK_PATH = "/run/mailer/lock"
    assert (engine.EMPTY_QUEUE_SLEEP, engine.LOCK_WAIT_TIMEOUT, engine.LOCK_PATH) == (7, 5, "/run/mailer/lock")
    del settings.MAILER_EMPTY_QUEUE_SLEEP
    assert engine.EMPTY_QUEUE_SLEEP == 30


def test_unknown_module_attributes_still_raise():
    with pytest.raises(AttributeError, match="module 'mailer.engine' has no attribute 'NO_SUCH_THING'"):
        engine.NO_SUCH_THING  # noqa: B018


def test_failure_rows_carry_the_message_id(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("to0@example.com")
    queue(1)
    message_id = Message.objects.get().email.extra_headers["Message-ID"]
    engine.send_all()
    assert MessageLog.objects.get(result=RESULT_FAILURE).message_id == message_id


def test_email_attribute_assignment_queues_any_email_message():
    message = Message()
    message.email = EmailMessage("Assigned", "Body", "f@example.com", ["t@example.com"])
    message.save()
    engine.send_all()
    assert mail.outbox[0].subject == "Assigned"


def test_a_message_queued_without_message_id_gets_one_kept_across_retries(deliver_to_smtp):
    """Rows queued by django-mailer 2.x, or by assigning Message.email, have no Message-ID yet."""
    message = Message()
    message.email = EmailMessage("No id yet", "Body", "f@example.com", ["t@example.com"])
    message.save()
    deliver_to_smtp.reply_to_data("451 4.3.0 Try again later")
    engine.send_all()
    deliver_to_smtp.reply_to_data(None)
    Message.objects.retry_deferred()
    engine.send_all()

    [received] = deliver_to_smtp.received
    failure, success = MessageLog.objects.order_by("pk")
    assert failure.result == RESULT_FAILURE and success.result == RESULT_SUCCESS
    assert failure.message_id == success.message_id == received.message["Message-ID"]
    assert Message.objects.count() == 0


def test_log_message_data_off_keeps_addresses_out_of_failure_rows_and_log_lines(settings, caplog, deliver_to_smtp):
    """Mail servers name the refused recipient in their reply; that must not reach the log either."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    deliver_to_smtp.reject_recipient("Private.Person@example.com")
    mailer.send_mail("Private matter", "Body", "f@example.com", ["Private.Person@example.com"])
    with caplog.at_level(logging.DEBUG, logger="mailer"):
        engine.send_all()
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert "550" in failure.log_message
    for secret in ["private.person@example.com", "Private matter"]:
        assert secret.lower() not in failure.log_message.lower()
        assert secret.lower() not in caplog.text.lower()


def test_a_message_id_given_at_the_first_attempt_is_saved_with_its_column(deliver_to_smtp):
    message = Message()
    message.email = EmailMessage("No id yet", "Body", "f@example.com", ["t@example.com"])
    message.save()
    deliver_to_smtp.reply_to_data("451 4.3.0 Try again later")
    engine.send_all()
    message.refresh_from_db()
    assert message.message_id and message.message_id == message.email.extra_headers["Message-ID"]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_receivers_of_the_rows_signals_hear_every_message_sent(count, deliver_to_smtp):
    """Recording skips the ORM for speed, except where the site listens: then its receivers run, as in 2.x."""
    queue(count)
    deleted, logged = [], []

    def on_delete(sender, instance, **kwargs):
        deleted.append(instance.message_id)

    def on_log(sender, instance, created, **kwargs):
        logged.append((instance.message_id, instance.result, created))

    post_delete.connect(on_delete, sender=Message)
    post_save.connect(on_log, sender=MessageLog)
    try:
        assert engine.send_all() == {"sent": count}
    finally:
        post_delete.disconnect(on_delete, sender=Message)
        post_save.disconnect(on_log, sender=MessageLog)

    sent_ids = sorted(received.message["Message-ID"] for received in deliver_to_smtp.received)
    assert sorted(deleted) == sent_ids
    assert sorted(logged) == [(message_id, RESULT_SUCCESS, True) for message_id in sent_ids]
    assert not Message.objects.exists()


class TestSentButNotRecorded:
    """Once a message has gone out, a failure to record it must not lead to sending it again at once.

    The database error while the log row is written is the one part mocked:
    it cannot be produced for real without breaking the test database.
    Sleeping between the attempts is skipped, to keep the tests fast.
    """

    def test_a_passing_database_error_is_retried(self):
        queue(1)
        real_row_for = MessageLog.objects.row_for
        calls = []

        def flaky_row_for(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise OperationalError("database is locked")
            return real_row_for(*args, **kwargs)

        with mock.patch.object(MessageLog.objects, "row_for", side_effect=flaky_row_for), mock.patch("time.sleep"):
            engine.send_all()
        assert len(mail.outbox) == 1
        assert Message.objects.count() == 0 and MessageLog.objects.get().result == RESULT_SUCCESS

    def test_a_lasting_one_marks_the_message_sent_and_nothing_is_sent_until_it_is_recorded(self, caplog):
        """A full disk, say: sending on would send mail that cannot be recorded, again and again.

        Sent messages are recorded two at a time: the first two go out, then neither can be recorded.
        """
        queue(3)
        cannot_record = mock.patch.object(MessageLog.objects, "row_for", side_effect=OperationalError("disk full"))
        with cannot_record, mock.patch("time.sleep"), pytest.raises(engine.SentButNotRecorded, match="disk full"):
            engine.send_all()

        assert len(mail.outbox) == 2
        marked = Message.objects.sent_but_not_recorded()
        assert sorted(message.subject for message in marked) == sorted(email.subject for email in mail.outbox)
        assert caplog.text.count("was sent but could not be recorded (disk full)") == 2

        # While they still cannot be recorded, no pass sends anything.
        with cannot_record, pytest.raises(OperationalError, match="disk full"):
            engine.send_all()
        assert len(mail.outbox) == 2

        # Once they can, the next pass records them, late, without sending them again, and sends the rest.
        assert engine.send_all() == {"sent": 1}
        assert len(mail.outbox) == 3
        assert Message.objects.count() == 0
        assert sorted(MessageLog.objects.values_list("log_message", flat=True)) == [
            "",
            "sent by an earlier pass, recorded late",
            "sent by an earlier pass, recorded late",
        ]

    def test_a_failure_after_the_deletion_is_retried_on_the_same_row(self):
        """As when the COMMIT fails (SQLite busy, a lost connection): delete() has already forgotten the pk."""
        queue(1)
        real_delete = Message.delete
        calls = []

        def delete_then_fail(message, *args, **kwargs):
            calls.append(message.pk)
            result = real_delete(message, *args, **kwargs)
            if len(calls) == 1:
                raise OperationalError("database is locked")  # inside the transaction: rolled back
            return result

        # A site listening to deletions: messages are then deleted through the ORM, whose delete() forgets the pk.
        listener = mock.Mock()
        post_delete.connect(listener, sender=Message)
        try:
            with mock.patch.object(Message, "delete", delete_then_fail), mock.patch("time.sleep"):
                assert engine.send_all() == {"sent": 1}
        finally:
            post_delete.disconnect(listener, sender=Message)

        assert len(calls) == 2 and calls[0] == calls[1]
        assert listener.called  # the receiver ran (once per attempt: the first was rolled back)
        assert len(mail.outbox) == 1
        assert Message.objects.count() == 0 and MessageLog.objects.get().result == RESULT_SUCCESS
