"""What the sending commands print, whatever the site's ``LOGGING``.

A site with no ``LOGGING`` for ``mailer`` sees nothing of the log; without
this, ``send_mail`` would be silent while every message is deferred.

- ``-v 0``: errors only, on standard error;
- ``-v 1`` (the default): one line per pass that handled mail, and why a
  pass did not run (sending paused, the lock held by another run);
- ``-v 2``: also one line per message, and on a long pass its progress, at
  most once every ``PROGRESS_INTERVAL`` seconds;
- ``-v 3``: also the ``mailer`` log at DEBUG, on standard error, when the
  site's logging shows it nowhere.

The log stays what it was: this output is the command's own.
"""

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError, OutputWrapper
from django.db import DatabaseError
from django.utils.translation import gettext, ngettext

from mailer.exceptions import ConfigurationError, SentButNotRecorded
from mailer.redaction import keeps_message_data, loggable
from mailer.reporting import Observer

if TYPE_CHECKING:
    from mailer.models import Message

# Seconds between two progress lines of a pass at -v 2; none before the pass has run this long.
PROGRESS_INTERVAL = 1.0


def one_line(error: BaseException) -> str:
    """The first line of what ``error`` says, and its type: database drivers add lines of SQL and hints."""
    lines = str(error).strip().splitlines()
    return f"{lines[0] if lines else ''} ({type(error).__name__})"


def command_error(error: BaseException) -> CommandError | None:
    """The CommandError (exit status 1) for an error that ends a command, or None for one that is a bug."""
    if isinstance(error, ConfigurationError | ImproperlyConfigured):
        text = gettext("configuration error: %(error)s")
    elif isinstance(error, DatabaseError | SentButNotRecorded):
        text = gettext("database error: %(error)s")
    else:
        return None
    return CommandError(text % {"error": one_line(error)}, returncode=1)


@contextlib.contextmanager
def errors_as_exit_status() -> Iterator[None]:
    """Turn a configuration or database error into a one-line message on standard error and exit status 1."""
    try:
        yield
    except Exception as error:
        replacement = command_error(error)
        if replacement is None:
            raise
        raise replacement from error


@contextlib.contextmanager
def debug_log_shown(stderr: OutputWrapper, loggers: tuple[str, ...], verbosity: int = 1) -> Iterator[None]:
    """Set ``loggers`` to DEBUG; show the ``mailer`` log on ``stderr`` if the site's logging shows it nowhere.

    Without a handler, Python shows only warnings and errors: ``--debug`` and
    ``-v 3`` would show nothing more. At verbosity 0 on such a site the log
    is silenced instead: the command prints its own errors, and cron mails
    whatever is printed. No ``loggers``: their levels stay as they are; the
    levels are restored afterwards either way.
    """
    mailer_log = logging.getLogger("mailer")
    handler: logging.Handler | None = None
    if not mailer_log.hasHandlers():
        if loggers:
            handler = logging.StreamHandler(stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        elif verbosity == 0:
            handler = logging.NullHandler()
    if handler is not None:
        mailer_log.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if handler is not None:
            mailer_log.removeHandler(handler)


class PassReport(Observer):
    """Prints what the passes of a command do, at its verbosity; safe to call from every sender thread.

    ``failures_printed``: whether a failed pass is printed here (``runmailer``
    goes on after one); ``send_mail`` ends with it instead.
    """

    def __init__(
        self, stdout: OutputWrapper, stderr: OutputWrapper, verbosity: int, *, failures_printed: bool = False
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.verbosity = verbosity
        self.failures_printed = failures_printed
        self._lock = threading.Lock()
        self._last_idle: str | None = None  # why the last pass did not run, not to print it again and again
        self._last_failure: BaseException | None = None
        self._started = 0.0
        self._next_progress = 0.0
        self._handled = 0
        self._due: int | None = None

    # Each line is flushed as it is written: under systemd, a container or a pipe, stdout is block-buffered, and
    # a long-running runmailer would otherwise say nothing for hours.
    def _out(self, text: str) -> None:
        with self._lock:
            self.stdout.write(text)
            self.stdout.flush()

    def _err(self, text: str) -> None:
        with self._lock:
            self.stderr.write(text)
            self.stderr.flush()

    def _idle(self, why: str, text: str) -> None:
        if self.verbosity >= 1 and self._last_idle != why:
            self._out(text)
        self._last_idle = why

    def paused(self) -> None:
        self._idle("paused", gettext("Sending is paused (MAILER_PAUSE_SEND): nothing sent."))

    def lock_held(self) -> None:
        self._idle("locked", gettext("The lock is held by another run: nothing sent."))

    def pass_started(self) -> None:
        self._due = self._count_due() if self.verbosity >= 2 else None
        with self._lock:
            self._last_idle = None
            self._started = time.monotonic()
            self._next_progress = self._started + PROGRESS_INTERVAL
            self._handled = 0

    def message_handled(self, pk: int, message: "Message | None", status: str) -> None:
        with self._lock:
            self._handled += 1
            handled = self._handled
            now = time.monotonic()
            progress_due = now >= self._next_progress
            if progress_due:
                self._next_progress = now + PROGRESS_INTERVAL
        if self.verbosity < 2:
            return
        self._out(_message_line(pk, message, status))
        if progress_due:
            self._out(self._progress_line(handled, now - self._started))

    @staticmethod
    def _count_due() -> int | None:
        """How many messages are due as the pass begins: what the progress lines count down from."""
        from mailer.models import Message, datetime_now

        try:
            return int(Message.objects.non_deferred().due(datetime_now()).count())
        except DatabaseError:
            return None  # the pass says what is wrong

    def _progress_line(self, handled: int, seconds: float) -> str:
        rate = handled / seconds if seconds > 0 else 0.0
        if self._due is None or rate <= 0:
            return gettext("Progress: %(handled)d handled, %(rate).1f per second.") % {
                "handled": handled,
                "rate": rate,
            }
        # Messages queued during the pass are not counted: they may wait for the next.
        left = max(self._due - handled, 0)
        eta = round(left / rate)
        return ngettext(
            "Progress: %(handled)d handled, %(rate).1f per second, %(left)d left, about %(eta)d second to go.",
            "Progress: %(handled)d handled, %(rate).1f per second, %(left)d left, about %(eta)d seconds to go.",
            eta,
        ) % {"handled": handled, "rate": rate, "left": left, "eta": eta}

    def server_unreachable(self, server: str, reason: str) -> None:
        self._err(
            gettext("Mail server unreachable: %(server)s (%(reason)s); the messages for it wait for the next pass.")
            % {"server": server, "reason": reason}
        )

    def pass_ended(self, counts: Counter[str], seconds: float) -> None:
        if self.verbosity < 1 or (self.verbosity < 2 and not sum(counts.values())):
            return  # a pass that found nothing to do says so only at -v 2
        self._out(
            gettext(
                "%(sent)d sent, %(deferred)d deferred, %(failed)d failed permanently, "
                "%(dont_send)d not sent (don't-send list), in %(seconds).2f seconds."
            )
            % {
                "sent": counts["sent"],
                "deferred": counts["deferred"],
                "failed": counts["failed"],
                "dont_send": counts["dont_send"],
                "seconds": seconds,
            }
        )

    def pass_failed(self, error: BaseException) -> None:
        with self._lock:
            if error is self._last_failure:
                return  # send_loop reports the error send_all reported
            self._last_failure = error
            self._last_idle = None
        if self.failures_printed:
            self._err(gettext("The sending pass failed: %(error)s") % {"error": one_line(error)})


def _message_line(pk: int, message: "Message | None", status: str) -> str:
    """One message's outcome: its Message-ID (or row id), and with message data kept, subject and recipients."""
    label = (message.message_id if message is not None else None) or f"#{pk}"
    if message is not None and keeps_message_data():
        label = f"{label} {message.subject_copy or ''!r} to {message.recipients or ''}"
    reason = _failure_reason(message) if status in ("deferred", "failed") else None
    texts = {
        "sent": gettext("sent: %(message)s"),
        "deferred": gettext("deferred: %(message)s"),
        "failed": gettext("failed permanently: %(message)s"),
        "dont_send": gettext("not sent (don't-send list): %(message)s"),
    }
    line = texts.get(status, "%(message)s") % {"message": label}
    if reason:
        line += f" ({reason})"
    return line


def _failure_reason(message: "Message | None") -> str | None:
    """Why the pass set ``message`` aside: the log row it wrote, as an operator reads it in the admin."""
    if message is None:
        return None
    from mailer.models import RESULT_FAILURE, MessageLog

    rows = MessageLog.objects.filter(result=RESULT_FAILURE)
    if message.message_id:
        rows = rows.filter(message_id=message.message_id)
    else:  # a row that could not be read has no Message-ID; its log row copies when it was queued
        rows = rows.filter(message_id=None, when_added=message.when_added)
    try:
        reason = rows.order_by("-pk").values_list("log_message", flat=True).first()
    except DatabaseError:
        return None
    return loggable(reason, message) if reason else None
