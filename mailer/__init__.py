"""Queue outgoing email in the database; ``manage.py send_mail`` sends it later.

The functions here have the signatures of ``django.core.mail``'s (and of
django-mailer 2.x) but only put messages on the queue.
"""

from collections.abc import Iterable, Sequence

from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.encoding import force_str
from django.utils.functional import Promise

from mailer.exceptions import ConfigurationError
from mailer.priority import get_priority

__version__ = "3.0.0.dev0"

__all__ = [
    "get_priority",
    "send_mail",
    "send_html_mail",
    "send_mass_mail",
    "mail_admins",
    "mail_managers",
]


def send_mail(
    subject: "str | Promise",
    message: "str | Promise",
    from_email: str | None,
    recipient_list: Sequence[str],
    priority: int | str | None = None,
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
) -> int:
    """Queue a plain text email; return 1, or 0 when it has no recipients (as Django's ``send_mail``).

    ``fail_silently``, ``auth_user`` and ``auth_password`` are accepted for
    compatibility with ``django.core.mail.send_mail`` and have no effect:
    delivery happens later, with the delivering backend's own settings.
    """
    email = EmailMessage(force_str(subject), force_str(message), from_email, recipient_list)
    return _queue(email, priority)


def send_html_mail(
    subject: "str | Promise",
    message: "str | Promise",
    message_html: "str | Promise",
    from_email: str | None,
    recipient_list: Sequence[str],
    priority: int | str | None = None,
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Queue an email with a plain text body and an HTML alternative; return 1, or 0 when it has no recipients."""
    email = EmailMultiAlternatives(force_str(subject), force_str(message), from_email, recipient_list, headers=headers)
    email.attach_alternative(force_str(message_html), "text/html")
    return _queue(email, priority)


def _queue(email: EmailMessage, priority: int | str | None) -> int:
    """Queue ``email``; return 1, or 0 (queueing nothing) when it has no recipients.

    Its addresses are checked first, so a ``None`` among the recipients is an
    error rather than a silently empty message.
    """
    from mailer.models import Message

    message = Message.for_email(email, priority=priority)
    if not email.recipients():
        return 0
    message.save()
    return 1


def send_mass_mail(
    datatuple: Iterable[tuple[str, str, str | None, Sequence[str]]],
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    connection: object = None,
) -> int:
    """Queue one email per ``(subject, message, from_email, recipient_list)``, all or none; return how many.

    As ``DbBackend`` does with many messages: one don't-send query and
    inserts in batches, in one transaction. A tuple without recipients
    queues nothing and is not counted.
    """
    from mailer.backend import queue_in_bulk

    return queue_in_bulk(
        EmailMessage(force_str(subject), force_str(message), sender, recipients)
        for subject, message, sender, recipients in datatuple
    )


def mail_admins(
    subject: str,
    message: str,
    fail_silently: bool = False,
    connection: object = None,
    priority: int | str | None = None,
) -> int:
    """Queue an email to the ``ADMINS``; return how many were queued (0 when there are none)."""
    return _mail_site_staff("ADMINS", subject, message, priority)


def mail_managers(
    subject: str,
    message: str,
    fail_silently: bool = False,
    connection: object = None,
    priority: int | str | None = None,
) -> int:
    """Queue an email to the ``MANAGERS``; return how many were queued (0 when there are none)."""
    return _mail_site_staff("MANAGERS", subject, message, priority)


def _mail_site_staff(setting_name: str, subject: str, message: str, priority: int | str | None) -> int:
    entries = getattr(settings, setting_name)
    if not entries:
        return 0
    if not isinstance(entries, (list, tuple)):
        raise ConfigurationError(f"The {setting_name} setting must be a list of email addresses.")
    recipients = []
    for entry in entries:
        # Django 6 writes ["a@example.com"]; earlier versions [("Name", "a@example.com")].
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            recipients.append(entry[1])
        elif isinstance(entry, str):
            recipients.append(entry)
        else:
            raise ConfigurationError(
                f"The {setting_name} setting must list email addresses or (name, address) pairs, not {entry!r}."
            )
    return send_mail(
        settings.EMAIL_SUBJECT_PREFIX + force_str(subject),
        message,
        settings.SERVER_EMAIL,
        recipients,
        priority=priority,
    )
