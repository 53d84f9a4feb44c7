"""``DbBackend``: an email backend that queues messages instead of sending them."""

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import Error, router, transaction

from mailer import conf
from mailer.exceptions import InvalidMailerEntry
from mailer.models import DontSendEntry, Message
from mailer.priority import get_priority, priority_option
from mailer.signals import mail_queued

# Without MAILER_MESSAGES_BATCH_SIZE, one INSERT holds up to this many
# messages, and no more stored data than BATCH_DATA_SIZE characters (unless
# one message alone is larger): MySQL refuses a statement longer than its
# max_allowed_packet (4 MB on MySQL 5.7, 16 MB on MariaDB), and a few large
# attachments would pass it. Django makes smaller batches where the database
# needs them (SQLite's limit on parameters).
BATCH_SIZE = 500
BATCH_DATA_SIZE = 2 * 1024 * 1024

logger = logging.getLogger(__name__)


class DbBackend(BaseEmailBackend):
    """Store each message in the queue; ``manage.py send_mail`` delivers it later.

    Set it as ``EMAIL_BACKEND``, or on Django 6.1 as a ``MAILERS`` entry,
    where two ``OPTIONS`` apply: ``deliver_using``, the alias of the mailer
    that delivers queued mail, and ``priority``, given to every message
    queued through this mailer ("high", "medium", "low" or a ``PRIORITY_*``
    constant from ``mailer.priority``). Any other option is refused by name,
    as Django's own backends refuse theirs (``InvalidMailer``).
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        deliver_using: str | None = None,
        priority: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        # Django passes ``alias`` (6.1) and reports unknown options; fail_silently
        # is this backend's own, as Django 6.1 wants of backends that take it.
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        alias = getattr(self, "alias", None)
        if deliver_using is not None and (not isinstance(deliver_using, str) or not deliver_using):
            raise InvalidMailerEntry(
                f"OPTIONS['deliver_using'] must be the alias of a mailer, not {deliver_using!r}.",
                alias=alias,
                check_id="mailer.E006",
            )
        self.deliver_using = deliver_using
        # Checked now so that a wrong OPTIONS value fails when the mailer is made, not per message.
        try:
            self.priority = priority_option(priority)
        except ValueError as exc:
            raise InvalidMailerEntry(f"OPTIONS['priority']: {exc}", alias=alias, check_id="mailer.E004") from None

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Queue ``email_messages`` in bulk; return how many were queued.

        Like Django's backends, skip messages without recipients. Every
        message is checked before any is queued, so a bad address in one
        (``InvalidAddress``) queues none of them; ``fail_silently`` does not
        hide that, as nothing is sent here that could fail later. It hides
        a database error, as Django's SMTP backend hides a mail server it
        cannot reach: the error is logged and nothing is queued. Django's
        ``AdminEmailHandler`` asks for it, and the error mail of a request
        whose transaction has failed must not raise in its logging call.
        """
        try:
            return queue_in_bulk(email_messages, self.priority, alias=getattr(self, "alias", None))
        except Error:  # DatabaseError, and InterfaceError (a connection the server dropped)
            if not self.fail_silently:
                raise
            _log_not_queued(len(email_messages))
            return 0


# Whether this thread is logging mail it could not queue: a handler that mails the log (AdminEmailHandler)
# fails the same way, and must not log again.
_logging_not_queued = threading.local()


def _log_not_queued(count: int) -> None:
    if getattr(_logging_not_queued, "active", False):
        return
    _logging_not_queued.active = True
    try:
        logger.exception("%d message(s) could not be queued (fail_silently)", count)
    finally:
        _logging_not_queued.active = False


def queue_in_bulk(
    emails: Iterable[EmailMessage], priority: int | str | None = None, *, alias: str | None = None
) -> int:
    """Queue ``emails`` together, all or none; return how many were queued (those with recipients).

    ``alias`` is the ``MAILERS`` entry they are queued through (Django 6.1),
    stored with each, so that they leave through its ``deliver_using``.
    The don't-send list is read once for all of them; then every email is
    checked and stored (``Message.row_for``), so that one refused writes
    nothing; then the rows are inserted in batches, in one transaction. The
    list is read before the transaction, which must begin by writing:
    SQLite cannot turn a reading transaction into a writing one while
    another process writes ("database is locked").
    """
    emails = list(emails)
    priority = get_priority(priority)
    batch_size = conf.get_setting("MAILER_MESSAGES_BATCH_SIZE")
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise ValueError(f"MAILER_MESSAGES_BATCH_SIZE must be a positive integer or None, not {batch_size!r}")
    suppressed = DontSendEntry.objects.suppressed_addresses(
        recipient for email in emails for recipient in _recipients_as_given(email)
    )
    checked = [(email, Message.row_for(email, priority, suppressed=suppressed, alias=alias)) for email in emails]
    rows = [row for email, row in checked if email.recipients()]
    if not rows:
        return 0
    using = router.db_for_write(Message)
    with transaction.atomic(using=using):
        for batch in _batches(rows, batch_size):
            Message.objects.db_manager(using).insert(batch)
    mail_queued.send(sender=Message, using=using, count=len(rows))
    return len(rows)


def _batches(rows: list[dict[str, Any]], batch_size: int | None) -> Iterator[list[dict[str, Any]]]:
    """Split the message ``rows`` into batches of ``batch_size`` (MAILER_MESSAGES_BATCH_SIZE) rows, or else of at
    most ``BATCH_SIZE`` rows and ``BATCH_DATA_SIZE`` characters.
    """
    if batch_size is not None:
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]
        return
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        if batch and (len(batch) == BATCH_SIZE or size + len(row["message_data"]) > BATCH_DATA_SIZE):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += len(row["message_data"])
    if batch:
        yield batch


def _recipients_as_given(email: EmailMessage) -> Iterator[str]:
    """Yield the recipients of ``email`` that are text, whatever else it holds: ``Message.for_email`` refuses
    the rest (``InvalidAddress``), after this lookup.
    """
    for field in (email.to, email.cc, email.bcc):
        if isinstance(field, (list, tuple)):
            yield from (recipient for recipient in field if isinstance(recipient, str) and recipient)
