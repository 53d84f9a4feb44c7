"""The lock file: a pass holds it while it sends, waits for it as told, and always gives it back.

Every lock here is a real ``lockfile`` lock in the test's own directory,
and "another process holds it" is a real second owner (see tests/locks.py).
"""

import logging
import os
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend

import mailer
from mailer import engine
from mailer.models import Message
from tests.alarms import time_limit
from tests.locks import lock_is_free

pytestmark = pytest.mark.django_db


def queue(count=1):
    for n in range(count):
        mailer.send_mail(f"Message {n}", "Body", "from@example.com", [f"to{n}@example.com"])


def watch_lock_while_receiving(server, lock_file: Path) -> list[tuple[bool, bool]]:
    """Return a list that gets, for each message the server receives, (the .lock file exists, it is free)."""
    seen: list[tuple[bool, bool]] = []
    path = str(lock_file.with_suffix(""))
    server.on_message(lambda received: seen.append((lock_file.exists(), lock_is_free(path))))
    return seen


def test_the_pass_holds_the_lock_file_while_it_delivers_and_releases_it_after(deliver_to_smtp, lock_path):
    queue(2)
    lock_file = Path(lock_path + ".lock")
    seen = watch_lock_while_receiving(deliver_to_smtp, lock_file)

    engine.send_all()

    assert seen == [(True, False), (True, False)]
    assert not lock_file.exists()
    assert lock_is_free(lock_path)


@pytest.mark.parametrize("setting", [None, ""], ids=["None", "empty"])
def test_without_a_lock_path_the_lock_is_send_mail_lock_in_the_working_directory(
    settings, deliver_to_smtp, tmp_path, monkeypatch, setting
):
    settings.MAILER_LOCK_PATH = setting
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    queue()
    seen = watch_lock_while_receiving(deliver_to_smtp, workdir / "send_mail.lock")

    engine.send_all()

    assert seen == [(True, False)]
    assert os.listdir(workdir) == []


def test_a_relative_lock_path_is_taken_from_the_working_directory(settings, deliver_to_smtp, tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    settings.MAILER_LOCK_PATH = "run/mailer"
    queue()
    seen = watch_lock_while_receiving(deliver_to_smtp, tmp_path / "run" / "mailer.lock")

    engine.send_all()

    assert seen == [(True, False)]


class BrokenBackend(BaseEmailBackend):
    """A delivering backend that cannot start; it notes first whether the lock file was free then."""

    saw_lock_free: list[bool] = []

    def __init__(self, **kwargs):
        self.saw_lock_free.append(lock_is_free(settings.MAILER_LOCK_PATH))
        raise RuntimeError("the backend is broken")


def test_the_lock_is_released_when_the_pass_ends_with_an_error(settings, lock_path):
    """A pass that raises must not leave the lock behind: every later pass would quit."""
    BrokenBackend.saw_lock_free.clear()
    settings.MAILER_EMAIL_BACKEND = "tests.test_lock.BrokenBackend"
    queue()

    with pytest.raises(RuntimeError, match="the backend is broken"):
        engine.send_all()

    assert BrokenBackend.saw_lock_free == [False]
    assert lock_is_free(lock_path)


@pytest.mark.parametrize("wait", ["unset", 0, -1])
def test_a_held_lock_makes_the_pass_quit_at_once_without_a_wait(settings, hold_lock, caplog, wait):
    """The default, as in django-mailer: cron starts send_mail again next minute anyway."""
    if wait != "unset":
        settings.MAILER_LOCK_WAIT_TIMEOUT = wait
    queue()
    holder = hold_lock()

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mailer.engine"), time_limit(5):
        assert engine.send_all() is None
    elapsed = time.monotonic() - started

    assert elapsed < 0.5
    assert "lock already in place. quitting." in caplog.text
    assert mail.outbox == [] and Message.objects.count() == 1
    assert holder.still_holds_it()


def test_a_held_lock_makes_the_pass_wait_lock_wait_timeout_then_give_up(settings, hold_lock, caplog):
    settings.MAILER_LOCK_WAIT_TIMEOUT = 1
    queue()
    holder = hold_lock()

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mailer.engine"), time_limit(5):
        assert engine.send_all() is None
    elapsed = time.monotonic() - started

    assert 1 <= elapsed < 1.8
    assert "waiting for the lock timed out. quitting." in caplog.text
    assert mail.outbox == [] and Message.objects.count() == 1
    assert holder.still_holds_it()


@pytest.mark.parametrize("wait", [5, None], ids=["5 seconds", "None"])
def test_a_lock_given_back_while_the_pass_waits_lets_it_send(settings, hold_lock, deliver_to_smtp, wait):
    """A positive wait, or None (as long as it takes): the pass goes ahead as soon as the other holder is done."""
    settings.MAILER_LOCK_WAIT_TIMEOUT = wait
    queue()
    holder = hold_lock(hold_for=0.3)

    counts = engine.send_all()

    assert counts is not None

    assert counts["sent"] == 1
    [received] = deliver_to_smtp.received
    assert holder.released_at is not None and received.received_at > holder.released_at


def test_with_use_file_lock_off_a_held_lock_does_not_stop_the_pass(settings, hold_lock):
    """Passes may then overlap (claims keep them apart); the lock file is not touched."""
    settings.MAILER_USE_FILE_LOCK = False
    queue()
    holder = hold_lock()

    counts = engine.send_all()

    assert counts is not None

    assert counts["sent"] == 1 and len(mail.outbox) == 1
    assert holder.still_holds_it()
