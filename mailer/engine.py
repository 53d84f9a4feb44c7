"""Drain the queue: claim a message, send it, record the outcome.

A pass (``send_all``) runs under the lock file and walks the queue in
priority order. Each message is

1. claimed in its own short UPDATE, marked with the pass's token and an
   expiry, so no other worker on any host takes it and a crashed worker's
   claim lapses by itself;
2. sent outside any transaction, over one connection that the pass opens
   once and reuses (a new one after a failure), so no database lock is held
   while the mail server is talking;
3. recorded in its own short transaction: a log row and the deletion, or a
   deferral.

Code written for django-mailer 2.x patches ``send_all``, ``prioritize``,
``acquire_lock``, ``release_lock``, ``logger``, ``lockfile.FileLock`` and
``time.sleep``; they are all looked up when called.
"""

import contextlib
import datetime
import logging
import smtplib
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import lockfile
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import DatabaseError, transaction
from django.utils.module_loading import import_string

from mailer import conf, stopping
from mailer.codec import decode
from mailer.delivery import check_delivery_route, get_delivery_connection
from mailer.exceptions import RedactedError, SentButNotRecorded, UndecodableData, UnstorableEmail
from mailer.message_id import ensure_message_id, get_message_id
from mailer.models import (
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
    datetime_now,
)
from mailer.redaction import keeps_message_data, loggable

__all__ = [
    "SentButNotRecorded",
    "acquire_lock",
    "handle_delivery_exception",
    "prioritize",
    "release_lock",
    "send_all",
    "send_loop",
]

logger = logging.getLogger(__name__)

# How often a sleeping send_loop looks whether it has been asked to stop.
STOP_CHECK_INTERVAL = 0.2

# How many queued ids a pass reads at a time; the rows themselves are read
# one by one, so memory stays flat however long the queue is.
CANDIDATES_PER_QUERY = 100

ErrorHandler = Callable[[BaseEmailBackend | None, Message, Exception], tuple[BaseEmailBackend | None, str]]

# django-mailer 2.x exposed these settings as module constants frozen at
# import; they are read from the settings whenever they are looked up.
_SETTING_ATTRIBUTES = {
    "EMPTY_QUEUE_SLEEP": "MAILER_EMPTY_QUEUE_SLEEP",
    "LOCK_WAIT_TIMEOUT": "MAILER_LOCK_WAIT_TIMEOUT",
    "LOCK_PATH": "MAILER_LOCK_PATH",
}


def __getattr__(name: str) -> Any:
    try:
        return conf.get_setting(_SETTING_ATTRIBUTES[name])
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def prioritize(queryset: Any = None) -> Any:
    """Return the messages of ``queryset`` (by default the non-deferred queue) in sending order."""
    if queryset is None:
        queryset = Message.objects.non_deferred()
    return queryset.order_by("priority", "when_added", "pk")


def acquire_lock() -> tuple[bool, Any]:
    """Take the lock file; return (whether it was taken, the lock)."""
    path = conf.get_setting("MAILER_LOCK_PATH") or "send_mail"
    logger.debug("acquiring lock...")
    lock = lockfile.FileLock(path)
    try:
        lock.acquire(conf.get_setting("MAILER_LOCK_WAIT_TIMEOUT"))
    except lockfile.AlreadyLocked:
        logger.error("lock already in place. quitting.")
        return False, lock
    except lockfile.LockTimeout:
        logger.error("waiting for the lock timed out. quitting.")
        return False, lock
    logger.debug("acquired.")
    return True, lock


def release_lock(lock: Any) -> None:
    logger.debug("releasing lock...")
    lock.release()
    logger.debug("released.")


def handle_delivery_exception(
    connection: BaseEmailBackend | None, message: Message, exc: Exception
) -> tuple[BaseEmailBackend | None, str]:
    """Defer ``message`` after a delivery error the mail server reported; re-raise anything else.

    Return the connection to go on with (None: open a new one) and
    "sent" or "deferred". ``MAILER_ERROR_HANDLER`` may name a replacement
    with the same contract.
    """
    deferrable = (
        smtplib.SMTPAuthenticationError,
        smtplib.SMTPDataError,
        smtplib.SMTPRecipientsRefused,
        smtplib.SMTPSenderRefused,
        socket.error,
    )
    if not isinstance(exc, deferrable):
        raise exc
    message.defer()
    logger.info("message deferred due to failure: %s", loggable(str(exc), message))
    MessageLog.objects.log(message, RESULT_FAILURE, log_message=str(exc))
    return None, "deferred"


def send_all(queryset: Any = None) -> Counter[str] | None:
    """Make one pass over the queue (or over ``queryset``), under the lock file.

    Return how many messages ended each way ("sent", "deferred",
    "dont_send"), or None when the pass did not run because
    sending is paused or another process holds the lock.
    """
    check_delivery_route()
    if conf.get_setting("MAILER_PAUSE_SEND"):
        logger.info("sending is paused, quitting.")
        return None
    error_handler = import_string(conf.get_setting("MAILER_ERROR_HANDLER"))

    use_file_lock = conf.get_setting("MAILER_USE_FILE_LOCK")
    if use_file_lock:
        acquired, lock = acquire_lock()
        if not acquired:
            return None
    started = time.monotonic()
    try:
        counts = _send_queued(queryset, error_handler)
    finally:
        if use_file_lock:
            release_lock(lock)
    duration = time.monotonic() - started
    logger.info(
        "%d sent; %d deferred; %d not sent (don't send list); done in %.2f seconds",
        counts["sent"],
        counts["deferred"],
        counts["dont_send"],
        duration,
        extra={"sent": counts["sent"], "deferred": counts["deferred"], "duration": duration},
    )
    return counts


def send_loop() -> None:
    """Send forever: a pass whenever the queue has something to send, else sleep ``MAILER_EMPTY_QUEUE_SLEEP``.

    It also sleeps after a pass that did nothing (sending paused, the lock
    held elsewhere, every message claimed by other workers), rather than
    asking the database again at once.
    """
    while not stopping.stop_requested():
        if Message.objects.non_deferred().exists() and send_all():
            continue
        _sleep_before_checking_again()


def _sleep_before_checking_again() -> None:
    sleep = conf.get_setting("MAILER_EMPTY_QUEUE_SLEEP")
    logger.debug("sleeping for %s seconds before checking queue again", sleep)
    # In short steps, so that a request to stop is seen within one.
    deadline = time.monotonic() + sleep
    while not stopping.stop_requested() and (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, STOP_CHECK_INTERVAL))


def _send_queued(queryset: Any, error_handler: ErrorHandler) -> Counter[str]:
    counts: Counter[str] = Counter()
    connection = None
    try:
        for message in _claim_messages(queryset, token=uuid.uuid4().hex):
            try:
                connection, outcome = _send_message(message, connection, error_handler)
            except SentButNotRecorded:
                raise  # it went out: its claim must hold
            except BaseException:
                # The pass is over (a configuration error, an interrupt):
                # free the message now rather than when its claim lapses.
                Message.objects.filter(pk=message.pk).update(claimed_until=None)
                raise
            counts[outcome] += 1
            if stopping.stop_requested():
                logger.info("asked to stop: ending the pass")
                break
            limit_reached = _limit_reached(counts)
            _throttle()
            if limit_reached:
                break
    finally:
        _close_quietly(connection)
    return counts


def _claim_messages(queryset: Any, token: str) -> Iterator[Message]:
    """Yield the messages of the queue, each claimed for this pass, in sending order.

    A message this pass has already tried keeps its ``claimed_by`` token, so
    a failure that leaves it in ``queryset`` is not tried twice in one pass.
    """
    while True:
        candidates = list(
            prioritize(queryset)
            .claimable(datetime_now())
            .exclude(claimed_by=token)
            .values_list("pk", flat=True)[:CANDIDATES_PER_QUERY]
        )
        if not candidates:
            return
        for pk in candidates:
            if not Message.objects.claim(pk, token, until=_claim_expiry()):
                continue  # another worker has it
            message = Message.objects.filter(pk=pk).first()
            if message is not None:
                yield message


def _read_email(message: Message) -> EmailMessage | None:
    """Return the email ``message`` holds, with its Message-ID; or defer the message, saying why, and return None.

    A row that cannot be read is never lost and never run: it waits,
    deferred, for a human to decide, and does not stop the messages behind it.
    """
    # Take the stored text off the instance: a large message is then held
    # once (as the email) while the backend renders it, not twice. Django
    # reloads the field if anything asks for it again.
    data = message.__dict__.pop("message_data")
    try:
        email = decode(data)
        if not isinstance(email, EmailMessage):
            raise UndecodableData(f"message data holds a {type(email).__name__}, not an email")
        email.recipients()  # the fields the engine relies on are usable
        if get_message_id(email) is None:
            # Queued by django-mailer or by assigning Message.email: give it its
            # Message-ID now, and keep it, so every attempt carries the same one.
            ensure_message_id(email)
            message.email = email
            message.save(update_fields=["message_data"])  # and the search columns, from it
            del message.__dict__["message_data"]  # held once, as the email
        return email
    except Exception as exc:
        reason = (
            str(exc) if isinstance(exc, UndecodableData) else f"message data is damaged: {type(exc).__name__}: {exc}"
        )
    logger.warning(
        "message deferred due to failure in converting from DB (%s). Added on '%s' with priority '%s'",
        loggable(reason, message),
        message.when_added,
        message.priority,
    )
    message.defer()
    MessageLog.objects.log(message, RESULT_FAILURE, log_message=reason)
    return None


def _claim_expiry() -> datetime.datetime:
    return datetime_now() + datetime.timedelta(seconds=conf.get_setting("MAILER_CLAIM_TIMEOUT"))


def _send_message(
    message: Message, connection: BaseEmailBackend | None, error_handler: ErrorHandler
) -> tuple[BaseEmailBackend | None, str]:
    """Send one claimed message; return the connection to go on with and the outcome."""
    email = _read_email(message)
    if email is None:
        return connection, "deferred"

    # The list may have grown since the message was queued.
    suppressed = DontSendEntry.objects.remove_suppressed_recipients(email)
    if suppressed and suppressed == email.recipients():
        _record(message, RESULT_DONT_SEND, _dont_send_reason(suppressed))
        return connection, "dont_send"

    reused = connection is not None
    if connection is None:
        connection = get_delivery_connection(message)
    redacted: RedactedError | None = None
    try:
        attributes = dict(vars(email))
        try:
            _log_sending(email)
            try:
                _deliver(connection, email, opening=not reused)
            except Exception as exc:
                if not (reused and _session_ended(exc)):
                    raise
                # The server ended the session the pass was reusing (idle
                # timeout, a per-session limit): the message was never tried.
                logger.info("the mail server ended the session (%s); opening a new one", loggable(str(exc), message))
                _close_quietly(connection)
                connection = get_delivery_connection(message)
                _deliver(connection, email, opening=True)
        except Exception as exc:
            try:
                new_connection, outcome = error_handler(connection, message, exc)
            except Exception as raised:
                # The handler re-raises what it does not know, so that the error
                # is seen. Set the message aside first: left in the queue, it
                # would come first again and stop every later pass.
                _set_aside(message, exc)
                if keeps_message_data():
                    raise
                # Its text may name the message's addresses, and so may the
                # errors chained to it: the replacement is raised outside these
                # blocks, with neither cause nor context.
                redacted = RedactedError(loggable(f"{type(raised).__name__}: {raised}", message))
            else:
                if new_connection is not connection:
                    _close_quietly(connection)
                return new_connection, outcome
        if redacted is not None:
            raise redacted

        if vars(email) != attributes:
            # The backend changed the message (an email service noting its own
            # id, say): log it as the backend left it, as django-mailer did.
            with contextlib.suppress(UnstorableEmail):  # not plain data: log the message as queued
                message.email = email
        _record_sent(message)
        return connection, "sent"
    except BaseException:
        # The pass ends here: close what this message opened, or the server
        # never gets its QUIT.
        _close_quietly(connection)
        raise


def _deliver(connection: BaseEmailBackend, email: EmailMessage, opening: bool) -> None:
    if opening:
        connection.open()
    connection.send_messages([email])


def _session_ended(exc: Exception) -> bool:
    """Return whether ``exc`` says the server closed the session, rather than refused the message."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    return isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 421


RECORD_ATTEMPTS = 3


def _record_sent(message: Message) -> None:
    """Record a delivered message, trying again briefly: a failure here risks sending it twice.

    If it still fails, the message keeps its claim, so no pass sends it again
    before ``MAILER_CLAIM_TIMEOUT`` has passed.
    """
    for attempt in range(1, RECORD_ATTEMPTS + 1):
        try:
            _record(message, RESULT_SUCCESS)
            return
        except DatabaseError as exc:
            if attempt == RECORD_ATTEMPTS:
                logger.error(
                    "message %s was sent but could not be recorded (%s); it stays claimed until %s",
                    message.message_id or message.pk,
                    exc,
                    message.claimed_until,
                )
                raise SentButNotRecorded(str(exc)) from exc
            time.sleep(0.5 * attempt)


def _record(message: Message, result: str, log_message: str = "") -> None:
    """Log the final outcome of ``message`` and take it off the queue, together."""
    if "message_data" in message.get_deferred_fields():
        # Read it before the transaction, which must begin by writing: SQLite
        # cannot turn a reading transaction into a writing one while another
        # process writes ("database is locked").
        message.refresh_from_db(fields=["message_data"])
    with transaction.atomic(using=message._state.db):
        MessageLog.objects.log(message, result, log_message=log_message)
        message.delete()


def _set_aside(message: Message, exc: Exception) -> None:
    """Defer ``message`` and log why, after an error the error handler did not handle."""
    message.defer()
    MessageLog.objects.log(message, RESULT_FAILURE, log_message=f"{type(exc).__name__}: {exc}")
    logger.error("message deferred after an unexpected error: %s: %s", type(exc).__name__, loggable(str(exc), message))


def _dont_send_reason(suppressed: list[str]) -> str:
    if not keeps_message_data():
        return "all recipients are on the don't send list"
    return "all recipients are on the don't send list: " + ", ".join(suppressed)


def _log_sending(email: Any) -> None:
    if keeps_message_data():
        logger.info("sending message '%s' to %s", email.subject, ", ".join(map(str, email.to)))
    else:
        logger.info("sending message %s", email.extra_headers.get("Message-ID", ""))


def _limit_reached(counts: Counter[str]) -> bool:
    max_batch = conf.get_setting("MAILER_EMAIL_MAX_BATCH")
    if max_batch is not None and counts["sent"] >= max_batch:
        logger.info("EMAIL_MAX_BATCH (%s) reached, stopping for this round", max_batch)
        return True
    max_deferred = conf.get_setting("MAILER_EMAIL_MAX_DEFERRED")
    if max_deferred is not None and counts["deferred"] >= max_deferred:
        logger.warning("EMAIL_MAX_DEFERRED (%s) reached, stopping for this round", max_deferred)
        return True
    return False


def _throttle() -> None:
    throttle = conf.get_setting("MAILER_EMAIL_THROTTLE")
    if throttle:
        logger.debug("Throttling email delivery. Sleeping %s seconds", throttle)
        time.sleep(throttle)


def _close_quietly(connection: BaseEmailBackend | None) -> None:
    if connection is None:
        return
    try:
        connection.close()
    except Exception:
        logger.debug("closing the delivery connection failed", exc_info=True)
