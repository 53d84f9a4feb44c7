"""Queued mail reaches a real SMTP server, and failures it reports are handled."""

import pytest

import mailer
from mailer import engine
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
    deliver_to_smtp.reject_recipient("nobody@example.com")
    mailer.send_mail("Refused", "", "from@example.com", ["nobody@example.com"])
    mailer.send_mail("Accepted", "", "from@example.com", ["somebody@example.com"])

    engine.send_all()

    assert [r.message["Subject"] for r in deliver_to_smtp.received] == ["Accepted"]
    [deferred] = Message.objects.all()
    assert deferred.priority == PRIORITY_DEFERRED
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert "No such user" in failure.log_message
    # A new connection is opened after a failure.
    assert deliver_to_smtp.connections == 2


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


def test_a_session_the_server_ends_is_reopened_without_deferring_the_message(deliver_to_smtp):
    """A 421 on a reused connection means "this session is over", not "this message failed"."""
    deliver_to_smtp.limit_messages_per_session(2)
    for n in range(5):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])

    counts = engine.send_all()

    assert (counts["sent"], counts["deferred"]) == (5, 0)
    assert len(deliver_to_smtp.received) == 5
    assert deliver_to_smtp.connections == 3
    assert set(MessageLog.objects.values_list("result", flat=True)) == {RESULT_SUCCESS}
