"""The management commands, run in-process with call_command."""

import datetime
from io import StringIO
from unittest import mock

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

import mailer
import mailer.models
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)

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


def make_logs():
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    message = Message.objects.get()
    for result in (RESULT_SUCCESS, RESULT_FAILURE, RESULT_DONT_SEND):
        MessageLog.objects.log(message, result)


def purge_in_two_days(*args):
    later = timezone.now() + datetime.timedelta(days=2)
    with mock.patch.object(mailer.models, "datetime_now", return_value=later):
        call_command("purge_mail_log", *args)


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
    make_logs()
    purge_in_two_days(*args)
    assert set(MessageLog.objects.values_list("result", flat=True)) == left


def test_purge_old_entries_returns_the_count():
    make_logs()
    later = timezone.now() + datetime.timedelta(days=2)
    with mock.patch.object(mailer.models, "datetime_now", return_value=later):
        assert MessageLog.objects.purge_old_entries(1) == 1
        assert MessageLog.objects.purge_old_entries(1, [RESULT_FAILURE, RESULT_DONT_SEND]) == 2


def test_runmailer_prints_a_banner_and_runs_the_loop():
    out = StringIO()
    with mock.patch("mailer.engine.send_loop") as send_loop:
        call_command("runmailer", stdout=out)
    send_loop.assert_called_once_with()
    assert "Starting django-mailer send loop." in out.getvalue()
    assert "Quit the loop with CONTROL-C." in out.getvalue()


def test_runmailer_debug_turns_on_debug_logging():
    import logging

    logger = logging.getLogger("mailer.engine")
    level = logger.level
    try:
        with mock.patch("mailer.engine.send_loop"):
            call_command("runmailer", "--debug", stdout=StringIO())
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(level)
