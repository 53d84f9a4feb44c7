"""A pass over the queue: claims, limits, the don't-send list at send time, patch points."""

import datetime
import logging
from unittest import mock

import lockfile
import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.db import OperationalError
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


def test_a_failed_message_is_tried_once_per_pass_even_if_still_selected(settings):
    settings.MAILER_ERROR_HANDLER = "tests.test_engine.count_and_defer"
    FAILURES.clear()
    queue(1)
    with mock.patch.object(LocmemBackend, "send_messages", side_effect=OSError("down")):
        engine.send_all(Message.objects.all())  # deferred messages stay in this queryset
    assert len(FAILURES) == 1


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


def test_throttle_sleeps_after_each_message(settings):
    settings.MAILER_EMAIL_THROTTLE = 0.25
    queue(3)
    with mock.patch("time.sleep") as sleep:
        engine.send_all()
    assert sleep.call_args_list == [mock.call(0.25)] * 3


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
    assert "message data is damaged: TypeError: unsupported operand type(s) for +: 'int' and 'list'" in reasons
    assert "message data is neither JSON nor a django-mailer pickle" in reasons
    assert "message data is not in a format this version knows (mailer=99)" in reasons
    assert any("RecursionError" in reason for reason in reasons), reasons
    assert "message deferred due to failure in converting from DB" in caplog.text
    assert [m.subject for m in mail.outbox] == ["Message 0"]


def test_an_unexpected_error_is_raised_but_does_not_stall_the_queue():
    """The default handler re-raises what it does not know (so the error is seen), as in 2.x,
    but the message is set aside, so later passes send the rest."""
    queue(2)
    with mock.patch.object(LocmemBackend, "send_messages", side_effect=[RuntimeError("bug"), 1]):
        with pytest.raises(RuntimeError, match="bug"):
            engine.send_all()
    failed = Message.objects.get(priority=PRIORITY_DEFERRED)
    assert failed.claimed_until is None
    assert MessageLog.objects.get().log_message == "RuntimeError: bug"

    engine.send_all()
    assert [m.subject for m in mail.outbox] == ["Message 1"]


def test_a_configuration_error_leaves_messages_untouched_and_free(settings):
    queue(1)
    with mock.patch("mailer.engine.get_delivery_connection", side_effect=ImportError("no such backend")):
        with pytest.raises(ImportError):
            engine.send_all()
    message = Message.objects.get()
    assert message.priority != PRIORITY_DEFERRED and message.claimed_until is None
    assert MessageLog.objects.count() == 0


def test_a_custom_error_handler_is_used(settings):
    settings.MAILER_ERROR_HANDLER = "tests.test_engine.count_and_defer"
    FAILURES.clear()
    queue(2)
    with mock.patch.object(LocmemBackend, "send_messages", side_effect=ValueError("refused")):
        engine.send_all()
    assert [str(e) for e in FAILURES] == ["refused", "refused"]
    assert Message.objects.deferred().count() == 2


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


class TestPatchPoints:
    """django-mailer 2.x code patches these names; they must take effect."""

    def test_lock_file_is_taken_with_the_configured_path_and_timeout(self, settings):
        settings.MAILER_LOCK_WAIT_TIMEOUT = 5
        lock = mock.Mock()
        with mock.patch("lockfile.FileLock", return_value=lock) as file_lock:
            with mock.patch("mailer.engine.prioritize", side_effect=KeyError("stop")) as prioritize:
                with pytest.raises(KeyError):
                    engine.send_all()
        file_lock.assert_called_once_with(settings.MAILER_LOCK_PATH)
        lock.acquire.assert_called_once_with(5)
        assert engine.LOCK_WAIT_TIMEOUT == 5
        prioritize.assert_called_once()
        lock.release.assert_called_once()

    def test_default_lock_path_is_send_mail_in_the_working_directory(self, settings):
        settings.MAILER_LOCK_PATH = None
        lock = mock.Mock()
        with mock.patch("lockfile.FileLock", return_value=lock) as file_lock:
            engine.send_all()
        file_lock.assert_called_once_with("send_mail")
        lock.acquire.assert_called_once_with(-1)

    @pytest.mark.parametrize("error", [lockfile.AlreadyLocked, lockfile.LockTimeout])
    def test_a_held_lock_means_no_pass(self, error, caplog):
        queue(1)
        lock = mock.Mock(**{"acquire.side_effect": error})
        with mock.patch("lockfile.FileLock", return_value=lock):
            engine.send_all()
        assert mail.outbox == []
        assert "quitting" in caplog.text

    def test_acquire_and_release_lock_are_looked_up_when_called(self, settings):
        with mock.patch("mailer.engine.acquire_lock", return_value=(True, "lock")) as acquire:
            with mock.patch("mailer.engine.release_lock") as release:
                engine.send_all()
                settings.MAILER_USE_FILE_LOCK = False
                engine.send_all()
        acquire.assert_called_once_with()
        release.assert_called_once_with("lock")

    def test_send_loop_sleeps_while_nothing_is_sendable(self, settings):
        settings.MAILER_EMPTY_QUEUE_SLEEP = 7
        mailer.send_mail("Deferred", "", "f@example.com", ["t@example.com"], priority=PRIORITY_DEFERRED)
        with mock.patch("mailer.engine.send_all") as send_all:
            with mock.patch("time.sleep", side_effect=StopIteration) as sleep:
                with pytest.raises(StopIteration):
                    engine.send_loop()
        sleep.assert_called_once_with(7)
        assert engine.EMPTY_QUEUE_SLEEP == 7
        send_all.assert_not_called()

    def test_send_loop_sleeps_after_a_pass_that_did_nothing(self, settings):
        """Paused, locked out, or everything claimed elsewhere: wait, don't spin."""
        settings.MAILER_PAUSE_SEND = True
        settings.MAILER_EMPTY_QUEUE_SLEEP = 3
        queue(1)
        with mock.patch("time.sleep", side_effect=StopIteration) as sleep, pytest.raises(StopIteration):
            engine.send_loop()
        sleep.assert_called_once_with(3)

    def test_send_all_reports_what_it_did(self, deliver_to_smtp):
        deliver_to_smtp.reject_recipient("to1@example.com")
        queue(3)
        counts = engine.send_all()
        assert (counts["sent"], counts["deferred"]) == (2, 1)

    def test_send_loop_sends_when_there_is_mail(self):
        queue(1)
        with mock.patch("mailer.engine.send_all", side_effect=StopIteration) as send_all:
            with pytest.raises(StopIteration):
                engine.send_loop()
        send_all.assert_called_once_with()

    def test_logger_is_the_module_attribute(self):
        Message.objects.create(message_data="garbage")
        with mock.patch("mailer.engine.logger") as logger:
            engine.send_all()
        assert "failure in converting from DB" in logger.warning.call_args[0][0]


def test_unknown_module_attributes_still_raise():
    with pytest.raises(AttributeError):
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


class TestSentButNotRecorded:
    """Once a message has gone out, a failure to record it must not lead to sending it again at once."""

    def test_a_passing_database_error_is_retried(self):
        queue(1)
        real_log = MessageLog.objects.log
        calls = []

        def flaky_log(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise OperationalError("database is locked")
            return real_log(*args, **kwargs)

        with mock.patch.object(MessageLog.objects, "log", side_effect=flaky_log), mock.patch("time.sleep"):
            engine.send_all()
        assert len(mail.outbox) == 1
        assert Message.objects.count() == 0 and MessageLog.objects.get().result == RESULT_SUCCESS

    def test_a_lasting_one_leaves_the_message_claimed(self):
        queue(1)
        with mock.patch.object(MessageLog.objects, "log", side_effect=OperationalError("disk full")):
            with mock.patch("time.sleep"), pytest.raises(engine.SentButNotRecorded):
                engine.send_all()
        message = Message.objects.get()
        assert message.claimed_until > timezone.now()

        engine.send_all()
        assert len(mail.outbox) == 1  # not sent a second time
