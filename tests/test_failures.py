"""What the mail server answers decides what happens to a message, and to the pass.

Every reply here comes from a real SMTP server on loopback (aiosmtpd), told
which code to answer with: 4xx replies, dropped and refused connections
and timeouts are temporary (deferred, retried by ``retry_deferred``); 5xx
refusals are permanent (kept for a human, never retried by themselves); a
server that cannot be reached, or will not let the client in, ends the pass
at once instead of costing one timeout per message.
"""

import datetime
import logging
import socket
import threading
import time

import pytest
from django.core.management import call_command
from django.utils import timezone

import mailer
from mailer import engine, stopping
from mailer.exceptions import ConfigurationError
from mailer.models import PRIORITY_DEFERRED, PRIORITY_MEDIUM, RESULT_FAILURE, RESULT_SUCCESS, Message, MessageLog
from tests.conftest import MAILERS_SUPPORTED, configure_smtp_delivery
from tests.smtp import SMTPServer

pytestmark = pytest.mark.django_db


def queue(count: int = 1, to: str = "to{n}@example.com") -> None:
    for n in range(count):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [to.format(n=n)])


def outcome(message: Message) -> tuple[int, bool]:
    message.refresh_from_db()
    return message.priority, message.failed_permanently


TRANSIENT_RCPT = ["450 4.2.1 Mailbox busy", "451 4.3.0 Local error", "452 4.5.3 Too many recipients"]
PERMANENT_RCPT = [
    "550 5.1.1 No such user",
    "551 5.1.6 User has moved",
    "552 5.2.2 Mailbox full",
    "553 5.1.3 Bad address syntax",
    "554 5.7.1 Relay access denied",
]


@pytest.mark.parametrize("reply", TRANSIENT_RCPT)
def test_a_temporary_refusal_defers_the_message_for_retry_deferred(deliver_to_smtp, reply):
    deliver_to_smtp.reject_recipient("to0@example.com", reply)
    queue(2)

    counts = engine.send_all()

    assert counts == {"sent": 1, "deferred": 1}
    [message] = Message.objects.all()
    assert outcome(message) == (PRIORITY_DEFERRED, False)
    assert reply.split()[0] in MessageLog.objects.get(result=RESULT_FAILURE).log_message
    assert Message.objects.retry_deferred() == 1


@pytest.mark.parametrize("reply", PERMANENT_RCPT)
def test_a_permanent_refusal_is_kept_and_never_retried_by_itself(deliver_to_smtp, reply):
    deliver_to_smtp.reject_recipient("to0@example.com", reply)
    queue(2)

    counts = engine.send_all()

    assert counts == {"sent": 1, "failed": 1}
    [message] = Message.objects.all()
    assert outcome(message) == (PRIORITY_DEFERRED, True)
    log = MessageLog.objects.get(result=RESULT_FAILURE)
    assert log.log_message == f"recipients refused: to0@example.com: {reply}"
    # Neither the cron job nor a later pass tries it again.
    assert Message.objects.retry_deferred() == 0
    call_command("retry_deferred")
    engine.send_all()
    assert outcome(message) == (PRIORITY_DEFERRED, True)
    assert len(deliver_to_smtp.received) == 1


@pytest.mark.parametrize("reply, permanent", [("451 4.3.0 Try later", False), ("554 5.6.0 Message rejected", True)])
def test_the_reply_to_the_message_itself_decides_the_same_way(deliver_to_smtp, reply, permanent):
    deliver_to_smtp.reply_to_data(reply)
    queue(1)

    engine.send_all()

    assert outcome(Message.objects.get()) == (PRIORITY_DEFERRED, permanent)
    assert reply.split()[0] in MessageLog.objects.get().log_message


def test_a_sender_refused_for_good_fails_permanently(deliver_to_smtp):
    deliver_to_smtp.reject_sender("from@example.com", "553 5.7.1 Sender address rejected")
    queue(1)

    assert engine.send_all() == {"failed": 1}
    assert MessageLog.objects.get().log_message == "sender from@example.com refused: 553 5.7.1 Sender address rejected"


def test_a_temporary_refusal_of_one_recipient_among_permanent_ones_is_temporary(deliver_to_smtp):
    """Trying again may get through to the one that was only busy."""
    deliver_to_smtp.reject_recipient("a@example.com", "550 5.1.1 No such user")
    deliver_to_smtp.reject_recipient("b@example.com", "450 4.2.1 Mailbox busy")
    mailer.send_mail("Two", "Body", "from@example.com", ["a@example.com", "b@example.com"])

    assert engine.send_all() == {"deferred": 1}
    assert outcome(Message.objects.get()) == (PRIORITY_DEFERRED, False)


def test_recipients_refused_while_others_were_accepted_are_in_the_log_row(deliver_to_smtp):
    """Django's SMTP backend drops these refusals; the delivering subclass keeps them."""
    deliver_to_smtp.reject_recipient("gone@example.com", "550 5.1.1 No such user")
    mailer.send_mail("Partly", "Body", "from@example.com", ["here@example.com", "gone@example.com"])

    assert engine.send_all() == {"sent": 1}

    [received] = deliver_to_smtp.received
    assert received.rcpt_tos == ["here@example.com"]
    log = MessageLog.objects.get()
    assert log.result == RESULT_SUCCESS
    assert log.log_message == "sent; recipients refused: gone@example.com: 550 5.1.1 No such user"


def test_the_refusals_of_one_message_are_not_logged_on_the_next(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("gone@example.com")
    mailer.send_mail("Partly", "Body", "from@example.com", ["here@example.com", "gone@example.com"])
    mailer.send_mail("Whole", "Body", "from@example.com", ["here@example.com"])

    engine.send_all()

    assert dict(MessageLog.objects.values_list("subject_copy", "log_message")) == {
        "Partly": "sent; recipients refused: gone@example.com: 550 5.1.1 No such user",
        "Whole": "",
    }


def test_with_message_data_off_the_refused_recipient_is_not_named(settings, deliver_to_smtp):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    deliver_to_smtp.reject_recipient("gone@example.com")
    mailer.send_mail("Partly", "Body", "from@example.com", ["here@example.com", "gone@example.com"])

    engine.send_all()

    log_message = MessageLog.objects.get().log_message
    assert "gone@example.com" not in log_message and "550 5.1.1 No such user" in log_message


# --------------------------------------------------------------------------
# Requeueing a permanent failure: a human decides
# --------------------------------------------------------------------------


def test_retry_deferred_include_permanent_requeues_permanent_failures_too(settings, deliver_to_smtp):
    settings.MAILER_EMAIL_MAX_RETRIES = 0  # a human overrides the limit of the cron job
    deliver_to_smtp.reject_recipient("to0@example.com")
    queue(1)
    engine.send_all()
    assert outcome(Message.objects.get()) == (PRIORITY_DEFERRED, True)

    deliver_to_smtp.recorder.rcpt_replies.clear()  # the address was fixed on the server's side
    call_command("retry_deferred", "--include-permanent")

    message = Message.objects.get()
    assert outcome(message) == (PRIORITY_MEDIUM, False) and message.retry_count == 1
    assert engine.send_all() == {"sent": 1}
    assert [r.rcpt_tos for r in deliver_to_smtp.received] == [["to0@example.com"]]


def test_the_admin_action_requeues_only_permanent_failures(admin_client, deliver_to_smtp):
    deliver_to_smtp.reject_recipient("to0@example.com")
    deliver_to_smtp.reject_recipient("to1@example.com", "450 4.2.1 Mailbox busy")
    queue(2)
    engine.send_all()

    response = admin_client.post(
        "/admin/mailer/message/",
        {"action": "requeue_failed_messages", "_selected_action": list(Message.objects.values_list("pk", flat=True))},
        follow=True,
    )

    assert [str(m) for m in response.context["messages"]] == ["1 message queued again."]
    assert dict(Message.objects.values_list("recipients", "priority")) == {
        "to0@example.com": PRIORITY_MEDIUM,
        "to1@example.com": PRIORITY_DEFERRED,
    }


# --------------------------------------------------------------------------
# Automatic retries with exponential backoff
# --------------------------------------------------------------------------


def make_due(message: Message) -> None:
    Message.objects.filter(pk=message.pk).update(retry_after=timezone.now() - datetime.timedelta(seconds=1))


def test_with_backoff_a_temporary_failure_schedules_the_next_attempt(settings, deliver_to_smtp):
    settings.MAILER_RETRY_BACKOFF = 60
    settings.MAILER_RETRY_BACKOFF_MAX = 200
    settings.MAILER_RETRY_MAX_ATTEMPTS = 3
    deliver_to_smtp.reject_recipient("to0@example.com", "451 4.3.0 Try later")
    queue(1)
    message = Message.objects.get()

    delays = []
    for _attempt in range(3):
        before = timezone.now()
        assert engine.send_all() == {"deferred": 1}
        message.refresh_from_db()
        assert message.priority == PRIORITY_MEDIUM  # still queued, not waiting for retry_deferred
        delays.append(round((message.retry_after - before).total_seconds() / 10) * 10)
        assert engine.send_all() == {}  # not due yet: not tried
        make_due(message)

    assert delays == [60, 120, 200]  # doubled each time, up to the cap
    assert message.retry_count == 3
    # The attempts are used up: it waits, deferred, as without backoff.
    assert engine.send_all() == {"deferred": 1}
    assert outcome(message) == (PRIORITY_DEFERRED, False)
    assert MessageLog.objects.filter(result=RESULT_FAILURE).count() == 4


def test_with_backoff_the_message_goes_out_when_its_time_comes(settings, deliver_to_smtp):
    settings.MAILER_RETRY_BACKOFF = 30
    deliver_to_smtp.reply_to_data("451 4.3.0 Try later")
    queue(1)
    engine.send_all()
    deliver_to_smtp.reply_to_data(None)

    make_due(Message.objects.get())
    assert engine.send_all() == {"sent": 1}
    assert len(deliver_to_smtp.received) == 1


def test_with_backoff_a_permanent_failure_is_not_retried(settings, deliver_to_smtp):
    settings.MAILER_RETRY_BACKOFF = 30
    deliver_to_smtp.reject_recipient("to0@example.com")
    queue(1)
    assert engine.send_all() == {"failed": 1}
    assert Message.objects.get().retry_after is None


# --------------------------------------------------------------------------
# Outages: the pass ends at once
# --------------------------------------------------------------------------


def deliver_to(settings, host: str, port: int, timeout: float | None, **login: str) -> None:
    if MAILERS_SUPPORTED:
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {
            "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
            "smtp": {
                "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
                "OPTIONS": {"host": host, "port": port, "timeout": timeout, **login},
            },
        }
    else:
        settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = host, port, timeout
        settings.EMAIL_HOST_USER = login.get("username", "")
        settings.EMAIL_HOST_PASSWORD = login.get("password", "")


def queue_many(count: int) -> None:
    mailer.send_mass_mail([(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"]) for n in range(count)])


def assert_one_deferred_rest_untouched(total: int) -> None:
    assert Message.objects.deferred().count() == 1
    assert Message.objects.non_deferred().count() == total - 1
    assert Message.objects.filter(claimed_until__isnull=False).count() == 0
    assert MessageLog.objects.count() == 1


def outage_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mailer")]


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections and never says a word, as a hung mail server does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)
        yield listener.getsockname()[1]


def test_a_server_that_is_down_ends_the_pass_after_one_message(settings, closed_port, caplog):
    deliver_to(settings, "127.0.0.1", closed_port, timeout=5)
    queue_many(1000)

    started = time.monotonic()
    counts = engine.send_all()
    elapsed = time.monotonic() - started

    assert counts == {"deferred": 1}
    assert_one_deferred_rest_untouched(1000)
    assert elapsed < 5
    [error] = outage_errors(caplog)
    assert f"the mail server 127.0.0.1:{closed_port}" in error and "cannot be reached" in error
    assert "ConnectionRefusedError" in error


def test_a_server_that_hangs_ends_the_pass_within_one_timeout(settings, silent_server, caplog):
    deliver_to(settings, "127.0.0.1", silent_server, timeout=1)
    queue_many(1000)

    started = time.monotonic()
    counts = engine.send_all()
    elapsed = time.monotonic() - started

    assert counts == {"deferred": 1}
    assert_one_deferred_rest_untouched(1000)
    assert 1 <= elapsed < 1 + 4  # one timeout, and the rest is the pass's own work
    [error] = outage_errors(caplog)
    assert f"the mail server 127.0.0.1:{silent_server}" in error and "cannot be reached" in error


def test_without_a_timeout_setting_the_delivering_backend_gives_up_after_60_seconds(settings):
    """Django's default is to wait for ever: the delivering backend waits 60 s at most."""
    from mailer.delivery import get_delivery_connection

    deliver_to(settings, "127.0.0.1", 25, timeout=None)
    assert getattr(get_delivery_connection(), "timeout", None) == 60


@pytest.mark.parametrize(
    "login, reply",
    [({}, "530"), ({"username": "user", "password": "wrong"}, "535")],
    ids=["not logged in", "wrong password"],
)
def test_a_server_that_refuses_the_login_ends_the_pass_with_one_error(settings, caplog, login, reply):
    server = SMTPServer(login=("user", "secret")).start()
    try:
        deliver_to(settings, server.host, server.port, timeout=5, **login)
        queue_many(20)

        counts = engine.send_all()

        assert counts == {"deferred": 1}
        assert_one_deferred_rest_untouched(20)
        [error] = outage_errors(caplog)
        assert f"{server.host}:{server.port}" in error and reply in error
        assert server.received == []
    finally:
        server.stop()


def test_the_right_login_gets_through(settings):
    """The control for the test above: the server really takes mail after a good login."""
    server = SMTPServer(login=("user", "secret")).start()
    try:
        deliver_to(settings, server.host, server.port, timeout=5, username="user", password="secret")
        queue_many(2)
        assert engine.send_all() == {"sent": 2}
    finally:
        server.stop()


def test_a_server_closing_every_session_with_421_ends_the_pass(deliver_to_smtp, caplog):
    deliver_to_smtp.limit_messages_per_session(0)
    queue_many(20)

    assert engine.send_all() == {"deferred": 1}

    assert_one_deferred_rest_untouched(20)
    assert "421" in MessageLog.objects.get().log_message
    assert len(outage_errors(caplog)) == 1


def test_the_outage_log_line_names_the_mailers_alias(settings, closed_port, caplog):
    if not MAILERS_SUPPORTED:
        pytest.skip("MAILERS is Django 6.1's")
    deliver_to(settings, "127.0.0.1", closed_port, timeout=5)
    queue_many(1)
    engine.send_all()
    [error] = outage_errors(caplog)
    assert "MAILERS['smtp']" in error


def test_after_an_outage_the_next_pass_sends_everything(settings, deliver_to_smtp, closed_port):
    deliver_to(settings, "127.0.0.1", closed_port, timeout=5)
    queue_many(5)
    engine.send_all()

    configure_smtp_delivery(settings, deliver_to_smtp)
    call_command("retry_deferred")
    assert engine.send_all() == {"sent": 5}


def test_a_421_to_a_recipient_ends_the_pass_too(deliver_to_smtp, caplog):
    """Rate limits at large providers answer RCPT with 421 and close the session: every message would get it."""
    for n in range(10):
        deliver_to_smtp.reject_recipient(f"to{n}@example.com", "421 4.7.0 Try again later, closing connection")
    queue(10)

    assert engine.send_all() == {"deferred": 1}

    assert_one_deferred_rest_untouched(10)
    assert deliver_to_smtp.connections == 1
    assert len(outage_errors(caplog)) == 1


# --------------------------------------------------------------------------
# Some recipients refused for now: they get a copy of their own
# --------------------------------------------------------------------------


def test_recipients_refused_for_now_get_a_copy_queued_for_them(deliver_to_smtp):
    """As a server limiting recipients per message does (452): the others got it, these must not be lost."""
    for address in ["cc@example.com", "bcc@example.com"]:
        deliver_to_smtp.reject_recipient(address, "452 4.5.3 Too many recipients")
    deliver_to_smtp.reject_recipient("gone@example.com", "550 5.1.1 No such user")
    mailer.send_mail("Board", "Body", "from@example.com", ["to@example.com", "gone@example.com"])
    message = Message.objects.get()
    email = message.email
    email.cc, email.bcc = ["cc@example.com"], ["bcc@example.com"]
    message.email = email
    message.save()

    assert engine.send_all() == {"sent": 1}

    copy = Message.objects.get()
    assert outcome(copy) == (PRIORITY_DEFERRED, False)
    original_log = MessageLog.objects.get(result=RESULT_SUCCESS)
    assert original_log.log_message == (
        "sent; recipients refused: gone@example.com: 550 5.1.1 No such user; "
        "cc@example.com: 452 4.5.3 Too many recipients; bcc@example.com: 452 4.5.3 Too many recipients; "
        f"those refused for now are queued again as message {copy.pk}"
    )
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert failure.message_id == original_log.message_id  # the same message, for the rest of its recipients
    assert "cc@example.com: 452" in failure.log_message and "gone@example.com" not in failure.log_message

    # Put back by the cron job, the copy reaches those two only, each as before (cc seen, bcc not).
    deliver_to_smtp.recorder.rcpt_replies.clear()
    call_command("retry_deferred")
    assert engine.send_all() == {"sent": 1}
    second = deliver_to_smtp.received[-1]
    assert second.rcpt_tos == ["cc@example.com", "bcc@example.com"]
    assert second.message["Cc"] == "cc@example.com" and second.message["Bcc"] is None
    assert second.message["Message-ID"] == deliver_to_smtp.received[0].message["Message-ID"]


def test_recipients_refused_for_good_get_no_copy(deliver_to_smtp):
    deliver_to_smtp.reject_recipient("gone@example.com", "550 5.1.1 No such user")
    mailer.send_mail("Board", "Body", "from@example.com", ["to@example.com", "gone@example.com"])

    engine.send_all()

    assert Message.objects.count() == 0


# --------------------------------------------------------------------------
# Settings that cannot work are refused before anything is sent
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAILER_RETRY_BACKOFF", "60"),
        ("MAILER_RETRY_BACKOFF", -60),
        ("MAILER_RETRY_BACKOFF_MAX", 0),
        ("MAILER_RETRY_MAX_ATTEMPTS", None),
        ("MAILER_RETRY_MAX_ATTEMPTS", 2.5),
    ],
)
def test_retry_settings_that_cannot_work_are_a_configuration_error(settings, deliver_to_smtp, name, value):
    settings.MAILER_RETRY_BACKOFF = 60
    setattr(settings, name, value)
    queue(1)

    with pytest.raises(ConfigurationError, match=name):
        engine.send_all()

    assert deliver_to_smtp.received == [] and Message.objects.get().claimed_until is None


# --------------------------------------------------------------------------
# Asked to stop: no other message is begun
# --------------------------------------------------------------------------


def test_a_stop_asked_for_during_the_throttle_ends_the_pass_at_once(settings, deliver_to_smtp):
    settings.MAILER_EMAIL_THROTTLE = 30
    queue(3)
    asker = threading.Timer(0.5, stopping._requested.set)  # what the signal handler does

    asker.start()
    started = time.monotonic()
    try:
        counts = engine.send_all()
    finally:
        asker.cancel()
        stopping._requested.clear()

    assert counts == {"sent": 1}
    assert time.monotonic() - started < 5
    assert Message.objects.filter(claimed_until__isnull=False).count() == 0
