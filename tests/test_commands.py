"""The management commands, run in-process with call_command."""

import datetime
import logging
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

import mailer
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)
from tests.alarms import raise_when

pytestmark = pytest.mark.django_db


def test_send_mail_sends_the_queue():
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    call_command("send_mail")
    assert len(mail.outbox) == 1


@pytest.mark.parametrize("command", ["send_mail", "retry_deferred"])
def test_cron_option_is_deprecated_but_accepted(command):
    with pytest.warns(DeprecationWarning, match=r"-c/--cron option is no longer necessary"):
        call_command(command, "--cron", "1")
    call_command(command, "-c", "0")  # no warning


def test_send_mail_does_nothing_while_paused(settings):
    settings.MAILER_PAUSE_SEND = True
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    call_command("send_mail")
    assert mail.outbox == []


def test_retry_deferred_requeues_within_max_retries(settings):
    settings.MAILER_EMAIL_MAX_RETRIES = 1
    for _ in range(2):
        mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"], priority=PRIORITY_DEFERRED)
    Message.objects.filter(pk=Message.objects.order_by("pk").first().pk).update(retry_count=1)

    call_command("retry_deferred")

    assert sorted(Message.objects.values_list("retry_count", "priority")) == [(1, 2), (1, PRIORITY_DEFERRED)]


def test_retry_deferred_never_requeues_with_max_retries_zero(settings):
    settings.MAILER_EMAIL_MAX_RETRIES = 0
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"], priority=PRIORITY_DEFERRED)
    assert Message.objects.retry_deferred() == 0


def make_logs(days_ago: float):
    """One log row of each result, attempted ``days_ago`` days ago."""
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    message = Message.objects.get()
    for result in (RESULT_SUCCESS, RESULT_FAILURE, RESULT_DONT_SEND):
        MessageLog.objects.log(message, result)
    MessageLog.objects.update(when_attempted=timezone.now() - datetime.timedelta(days=days_ago))


@pytest.mark.parametrize(
    "args, left",
    [
        (["1"], {RESULT_FAILURE, RESULT_DONT_SEND}),
        (["1", "-r", "success"], {RESULT_FAILURE, RESULT_DONT_SEND}),
        (["1", "-r", "failure"], {RESULT_SUCCESS, RESULT_DONT_SEND}),
        (["1", "--result", "all"], set()),
        (["3", "-r", "all"], {RESULT_SUCCESS, RESULT_FAILURE, RESULT_DONT_SEND}),
    ],
)
def test_purge_mail_log(args, left):
    make_logs(days_ago=2)
    call_command("purge_mail_log", *args)
    assert set(MessageLog.objects.values_list("result", flat=True)) == left


def test_purge_old_entries_returns_the_count():
    make_logs(days_ago=2)
    assert MessageLog.objects.purge_old_entries(1) == 1
    assert MessageLog.objects.purge_old_entries(1, [RESULT_FAILURE, RESULT_DONT_SEND]) == 2


@pytest.mark.parametrize("days", ["1000000", "99999999999"])
def test_purge_mail_log_with_more_days_than_a_date_goes_back_deletes_nothing(days, capsys):
    make_logs(days_ago=2)
    call_command("purge_mail_log", days, "-r", "all")
    assert MessageLog.objects.count() == 3
    assert "0 log entries deleted" in capsys.readouterr().out


def test_purge_keeps_entries_younger_than_the_days_given():
    make_logs(days_ago=0.9)
    call_command("purge_mail_log", "1", "-r", "all")
    assert MessageLog.objects.count() == 3


def summary_logged(caplog):
    return lambda: any(" sent; " in record.getMessage() for record in caplog.records)


def run_runmailer(*args, stop_when, stdout=None):
    """Run runmailer in this process until ``stop_when()`` holds, then Ctrl-C it (a real SIGALRM-driven interrupt)."""
    try:
        with raise_when(stop_when):
            call_command("runmailer", *args, stdout=stdout or StringIO())
    except KeyboardInterrupt:
        pytest.fail("runmailer let Ctrl-C through instead of stopping")


def test_runmailer_sends_the_queue_until_interrupted(caplog):
    """The real loop: it sends what is queued, goes to sleep, and Ctrl-C (a real signal here) stops it."""
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    out = StringIO()

    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        run_runmailer(stop_when=summary_logged(caplog), stdout=out)

    assert [m.subject for m in mail.outbox] == ["Subject"]
    assert "Starting django-mailer send loop." in out.getvalue()
    assert "Quit the loop with CONTROL-C." in out.getvalue()
    assert out.getvalue().rstrip().endswith("Stopped.")


@pytest.mark.parametrize("debug", [True, False], ids=["--debug", "without --debug"])
def test_runmailer_debug_turns_on_debug_logging(caplog, debug):
    """--debug shows the engine's DEBUG lines (taking the lock, sleeping) that the logging settings would hide."""
    engine_logger = logging.getLogger("mailer.engine")
    level = engine_logger.level
    caplog.set_level(logging.INFO)  # the site's logging: INFO and up
    caplog.handler.setLevel(logging.DEBUG)  # what reaches the handler is up to the loggers
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    try:
        run_runmailer(*(["--debug"] if debug else []), stop_when=summary_logged(caplog))
    finally:
        engine_logger.setLevel(level)

    debug_lines = {r.getMessage() for r in caplog.records if r.name == "mailer.engine" and r.levelno == logging.DEBUG}
    assert ("acquiring lock..." in debug_lines) is debug
