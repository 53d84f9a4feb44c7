"""Queued mail reaches a real SMTP server, and failures it reports are handled."""

import gc
import logging
import smtplib
import warnings
from unittest import mock

import pytest
from django.db import OperationalError

import mailer
from mailer import engine
from mailer.exceptions import SentButNotRecorded
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db


def test_queued_mail_is_delivered_and_logged(deliver_to_smtp):
    mailer.send_mail("Hello", "Body text", "from@example.com", ["to@example.com"])
    assert deliver_to_smtp.received == []  # queueing sends nothing

    engine.send_all()

    [received] = deliver_to_smtp.received
    assert received.mail_from == "from@example.com"
    assert received.rcpt_tos == ["to@example.com"]
    assert received.message["Subject"] == "Hello"
    assert received.message.get_content().strip() == "Body text"
    assert Message.objects.count() == 0
    [log] = MessageLog.objects.all()
    assert log.result == RESULT_SUCCESS
    assert log.message_id == received.message["Message-ID"]


def test_one_connection_serves_the_whole_pass(deliver_to_smtp):
    for n in range(5):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])

    engine.send_all()

    assert len(deliver_to_smtp.received) == 5
    assert deliver_to_smtp.connections == 1


def test_messages_go_out_in_priority_order_then_oldest_first(deliver_to_smtp):
    mailer.send_mail("low", "", "from@example.com", ["a@example.com"], priority=PRIORITY_LOW)
    mailer.send_mail("medium 1", "", "from@example.com", ["a@example.com"])
    mailer.send_mail("high", "", "from@example.com", ["a@example.com"], priority=PRIORITY_HIGH)
    mailer.send_mail("medium 2", "", "from@example.com", ["a@example.com"])

    engine.send_all()

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["high", "medium 1", "medium 2", "low"]


def test_refused_recipient_defers_the_message_and_the_pass_goes_on(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("nobody@example.com", "450 4.2.1 No such user here yet")
    mailer.send_mail("Refused", "", "from@example.com", ["nobody@example.com"])
    mailer.send_mail("Accepted", "", "from@example.com", ["somebody@example.com"])

    engine.send_all()

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Accepted"]
    [deferred] = Message.objects.all()
    assert deferred.priority == PRIORITY_DEFERRED
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert "No such user" in failure.log_message
    # After a refusal the session is reset and goes on.
    assert deliver_to_smtp.connections == 1


def test_message_id_is_stable_across_retries_and_in_failure_rows(deliver_to_smtp):
    deliver_to_smtp.reply_to_data("451 4.3.0 Try again later")
    mailer.send_mail("Retry me", "", "from@example.com", ["to@example.com"])
    queued_id = Message.objects.get().email.extra_headers["Message-ID"]

    engine.send_all()
    deliver_to_smtp.reply_to_data(None)
    assert Message.objects.retry_deferred() == 1
    engine.send_all()

    [received] = deliver_to_smtp.received
    assert received.message["Message-ID"] == queued_id
    assert list(MessageLog.objects.order_by("pk").values_list("result", "message_id")) == [
        (RESULT_FAILURE, queued_id),
        (RESULT_SUCCESS, queued_id),
    ]


def test_server_down_defers_instead_of_crashing(settings, smtp_server):
    from tests.conftest import configure_smtp_delivery

    configure_smtp_delivery(settings, smtp_server)
    smtp_server.stop()
    mailer.send_mail("Nobody listens", "", "from@example.com", ["to@example.com"])

    engine.send_all()

    assert Message.objects.get().priority == PRIORITY_DEFERRED
    assert MessageLog.objects.get().result == RESULT_FAILURE


def queue_five():
    for n in range(5):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])


def test_a_session_the_server_ends_with_421_is_reopened_without_deferring_the_message(deliver_to_smtp, caplog):
    """A 421 on a reused connection means "this session is over", not "this message failed".

    The server answers the third MAIL FROM of a session with 421 and hangs
    up, as a server with a per-session limit does: the message it turned
    away goes out first thing on the next connection.
    """
    deliver_to_smtp.limit_messages_per_session(2)
    queue_five()

    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        counts = engine.send_all()
        assert counts is not None

    assert (counts["sent"], counts["deferred"]) == (5, 0)
    assert [(r.message["Subject"], r.session) for r in deliver_to_smtp.received] == [
        ("Message 0", 1),
        ("Message 1", 1),
        ("Message 2", 2),
        ("Message 3", 2),
        ("Message 4", 3),
    ]
    assert deliver_to_smtp.hang_ups == 2
    reopened = [r.getMessage() for r in caplog.records if "ended the session" in r.getMessage()]
    assert len(reopened) == 2 and all("421" in line for line in reopened), reopened
    assert set(MessageLog.objects.values_list("result", flat=True)) == {RESULT_SUCCESS}


def test_a_session_the_server_closed_without_a_word_is_reopened_without_deferring_the_message(deliver_to_smtp, caplog):
    """An idle timeout: the server has gone when the pass sends on the connection it kept (SMTPServerDisconnected)."""
    deliver_to_smtp.hang_up_after(2)
    queue_five()

    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        counts = engine.send_all()
        assert counts is not None

    assert (counts["sent"], counts["deferred"]) == (5, 0)
    assert [r.session for r in deliver_to_smtp.received] == [1, 1, 2, 2, 3]
    reopened = [r.getMessage() for r in caplog.records if "ended the session" in r.getMessage()]
    assert len(reopened) == 2, reopened
    assert "421" not in " ".join(reopened)
    assert Message.objects.count() == 0
    assert set(MessageLog.objects.values_list("result", flat=True)) == {RESULT_SUCCESS}


def test_a_session_lost_once_the_message_went_out_defers_it_rather_than_sending_it_again(deliver_to_smtp):
    """The server took the third message and hung up before it answered: it may deliver it, so the message is
    deferred (as after a timeout), never sent again at once."""
    deliver_to_smtp.hang_up_taking("to2@example.com")
    queue_five()

    first = engine.send_all()
    after = engine.send_all()  # the first pass ends at a lost session, as at any connection failure

    assert first == {"sent": 2, "deferred": 1} and after == {"sent": 2}
    arrived = sorted(r.rcpt_tos[0] for r in deliver_to_smtp.received)
    assert arrived == [f"to{n}@example.com" for n in range(5)], "sent twice, or not at all"
    deferred = Message.objects.get()
    assert (deferred.priority, deferred.recipients) == (PRIORITY_DEFERRED, "to2@example.com")
    assert "SMTPServerDisconnected" in MessageLog.objects.get(result=RESULT_FAILURE).log_message


def test_a_session_lost_at_the_data_command_sends_the_message_again_at_once(deliver_to_smtp):
    """Before the server's 354 none of the message's text went out: as after an idle timeout, a new session."""
    deliver_to_smtp.hang_up_at_data("to2@example.com")
    queue_five()

    assert engine.send_all() == {"sent": 5}

    assert sorted(r.rcpt_tos[0] for r in deliver_to_smtp.received) == [f"to{n}@example.com" for n in range(5)]
    assert deliver_to_smtp.hang_ups == 1


def test_a_421_on_a_new_session_defers_the_message_rather_than_reconnecting_again(deliver_to_smtp):
    """Only a reused session may have simply expired: a server refusing a fresh one is a failure."""
    deliver_to_smtp.limit_messages_per_session(0)
    mailer.send_mail("Refused", "Body", "from@example.com", ["to@example.com"])

    counts = engine.send_all()

    assert counts is not None

    assert (counts["sent"], counts["deferred"]) == (0, 1)
    assert deliver_to_smtp.connections == 1
    assert Message.objects.get().priority == PRIORITY_DEFERRED
    assert "421" in MessageLog.objects.get(result=RESULT_FAILURE).log_message


def test_the_test_server_hangs_up_after_its_421_as_real_servers_do(smtp_server):
    """The reopening tests above rely on it: a 421 ends the session on the server's side too."""
    smtp_server.limit_messages_per_session(0)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.ehlo()
        assert client.docmd("MAIL FROM:<from@example.com>")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected, match="Connection unexpectedly closed"):
            client.noop()


def give_up(connection, message, exc):
    """An error handler that raises, as django-mailer 2.x's did with errors it did not know."""
    raise RuntimeError("the handler gives up")


@pytest.mark.parametrize("ending", ["the error handler raises", "the sent message cannot be recorded"])
def test_a_pass_that_ends_with_an_error_still_closes_its_connection(settings, deliver_to_smtp, monkeypatch, ending):
    """Left open, the session ties up a slot on the mail server until it times out, and the socket leaks."""
    mailer.send_mail("Subject", "Body", "from@example.com", ["to@example.com"])
    # pytest keeps log records until the test ends, and the engine logs the error, which holds the
    # connection through its traceback: silence the logger so that a leaked socket is collected here.
    monkeypatch.setattr(logging.getLogger("mailer.engine"), "disabled", True)

    with warnings.catch_warnings():
        # A leaked socket warns when it is collected: the assertions below say so instead.
        warnings.simplefilter("ignore", ResourceWarning)
        if ending == "the error handler raises":
            settings.MAILER_ERROR_HANDLER = "tests.test_delivery_smtp.give_up"
            deliver_to_smtp.reject_recipient("to@example.com")
            engine.send_all()  # the message is set aside; the pass goes on, then ends
        else:
            # The database error is mocked: it cannot be produced for real without breaking the test database.
            with (
                mock.patch.object(MessageLog.objects, "log_and_delete", side_effect=OperationalError("disk full")),
                mock.patch("time.sleep"),
                pytest.raises(SentButNotRecorded, match="disk full"),
            ):
                engine.send_all()
        gc.collect()

    assert deliver_to_smtp.connections == 1
    assert deliver_to_smtp.quits == 1


@pytest.mark.django_db
def test_a_reply_to_data_that_times_out_on_a_reused_session_is_not_sent_again_at_once(settings, deliver_to_smtp):
    """The server may have taken the message before it went quiet: sending it again over a new session could
    deliver it twice. It is deferred instead, as after any timeout.
    """
    if getattr(settings, "MAILERS", None):
        settings.MAILERS = {**settings.MAILERS, "smtp": {**settings.MAILERS["smtp"]}}
        settings.MAILERS["smtp"]["OPTIONS"] = {**settings.MAILERS["smtp"]["OPTIONS"], "timeout": 1}
    else:
        settings.EMAIL_TIMEOUT = 1
    deliver_to_smtp.on_message(lambda _received: deliver_to_smtp.delay_each_message(2.5))  # slow from the second
    mailer.send_mail("One", "Body", "from@example.com", ["a@example.com"])
    mailer.send_mail("Two", "Body", "from@example.com", ["b@example.com"])

    counts = engine.send_all()

    assert counts is not None and (counts["sent"], counts["deferred"]) == (1, 1)
    assert deliver_to_smtp.connections == 1, "no second session to send it again"
    assert Message.objects.get().subject == "Two"
