"""``DbBackend``: an email backend that queues messages instead of sending them."""

from collections.abc import Sequence
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from mailer import conf
from mailer.models import Message
from mailer.priority import get_priority


class DbBackend(BaseEmailBackend):
    """Store each message in the queue; ``manage.py send_mail`` delivers it later.

    Set it as ``EMAIL_BACKEND``, or on Django 6.1 as a ``MAILERS`` entry,
    where two ``OPTIONS`` apply: ``deliver_using``, the alias of the mailer
    that delivers queued mail, and ``priority``, given to every message
    queued through this mailer.
    """

    def __init__(self, *args: Any, deliver_using: str | None = None, priority: int | str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deliver_using = deliver_using
        # Checked now so that a wrong OPTIONS value fails at start-up, not per message.
        self.priority = get_priority(priority)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Queue ``email_messages`` in bulk; return how many were queued.

        Like Django's backends, skip messages without recipients. Every
        message is checked before any is queued, so a bad address in one
        (``InvalidAddress``) queues none of them.
        """
        checked = [(email, Message.for_email(email, priority=self.priority)) for email in email_messages]
        messages = [message for email, message in checked if email.recipients()]
        Message.objects.bulk_create(messages, batch_size=conf.get_setting("MAILER_MESSAGES_BATCH_SIZE"))
        return len(messages)
