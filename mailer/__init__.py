"""Queue outgoing email in the database; ``manage.py send_mail`` sends it later.

The functions here take what ``django.core.mail``'s take on the installed
Django (``html_message``; ``using`` on 6.1; the ``connection``,
``fail_silently``, ``auth_user`` and ``auth_password`` that Django 6.1
deprecates, with Django's own warnings), plus ``priority``, and keep the
positional order of django-mailer 2.x. They only put messages on the queue:
what would choose or configure a connection has no effect.
"""

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils import deprecation as django_deprecation
from django.utils.encoding import force_str
from django.utils.functional import Promise

from mailer.exceptions import ConfigurationError
from mailer.priority import get_priority

if TYPE_CHECKING:
    from mailer.backend import DbBackend

try:  # Django 6.1 deprecates these arguments of its mail functions.
    from django.core.mail.deprecation import AUTH_ARGS_WARNING, CONNECTION_ARG_WARNING, FAIL_SILENTLY_ARG_WARNING

    ARGUMENTS_DEPRECATED = True
except ImportError:
    ARGUMENTS_DEPRECATED = False

# The category of Django 6.1's deprecations (Django 5.2 has none of them).
DJANGO_DEPRECATION: type[Warning] = getattr(django_deprecation, "RemovedInDjango2028Warning", DeprecationWarning)

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
    *,
    connection: object = None,
    html_message: "str | Promise | None" = None,
    using: str | None = None,
) -> int:
    """Queue an email; return 1, or 0 when it has no recipients (as Django's ``send_mail``).

    With ``html_message`` it is an ``EmailMultiAlternatives`` with that HTML
    alternative. ``using`` (Django 6.1) names the ``DbBackend`` mailer to
    queue through, whose ``priority`` option applies unless ``priority`` is
    given. ``connection``, ``fail_silently``, ``auth_user`` and
    ``auth_password`` are accepted as Django accepts them and have no
    effect: delivery happens later, with the delivering backend's settings.
    """
    _check_arguments("send_mail", connection, fail_silently, auth_user, auth_password, using)
    priority, alias = _queueing(priority, using)
    if not html_message:
        email = EmailMessage(force_str(subject), force_str(message), from_email, recipient_list)
        return _queue(email, priority, alias)
    email = EmailMultiAlternatives(force_str(subject), force_str(message), from_email, recipient_list)
    email.attach_alternative(force_str(html_message), "text/html")
    return _queue(email, priority, alias)


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
    *,
    connection: object = None,
    using: str | None = None,
) -> int:
    """Queue an email with a plain text body and an HTML alternative; return 1, or 0 when it has no recipients.

    The other arguments are ``send_mail``'s.
    """
    _check_arguments("send_html_mail", connection, fail_silently, auth_user, auth_password, using)
    priority, alias = _queueing(priority, using)
    email = EmailMultiAlternatives(force_str(subject), force_str(message), from_email, recipient_list, headers=headers)
    email.attach_alternative(force_str(message_html), "text/html")
    return _queue(email, priority, alias)


def send_mass_mail(
    datatuple: Iterable[tuple[str, str, str | None, Sequence[str]]],
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    connection: object = None,
    *,
    using: str | None = None,
    priority: int | str | None = None,
) -> int:
    """Queue one email per ``(subject, message, from_email, recipient_list)``, all or none; return how many.

    As ``DbBackend`` does with many messages: one don't-send query and
    inserts in batches, in one transaction. A tuple without recipients
    queues nothing and is not counted. The other arguments are ``send_mail``'s.
    """
    from mailer.backend import queue_in_bulk

    _check_arguments("send_mass_mail", connection, fail_silently, auth_user, auth_password, using)
    queue_priority, alias = _queueing(priority, using)
    return queue_in_bulk(
        (
            EmailMessage(force_str(subject), force_str(message), sender, recipients)
            for subject, message, sender, recipients in datatuple
        ),
        queue_priority,
        alias=alias,
    )


def mail_admins(
    subject: "str | Promise",
    message: "str | Promise",
    fail_silently: bool = False,
    connection: object = None,
    priority: int | str | None = None,
    *,
    html_message: "str | Promise | None" = None,
    using: str | None = None,
) -> int:
    """Queue an email to the ``ADMINS``; return how many were queued (0 when there are none)."""
    _check_arguments("mail_admins", connection, fail_silently, None, None, using)
    return _mail_site_staff("ADMINS", subject, message, priority, html_message, using)


def mail_managers(
    subject: "str | Promise",
    message: "str | Promise",
    fail_silently: bool = False,
    connection: object = None,
    priority: int | str | None = None,
    *,
    html_message: "str | Promise | None" = None,
    using: str | None = None,
) -> int:
    """Queue an email to the ``MANAGERS``; return how many were queued (0 when there are none)."""
    _check_arguments("mail_managers", connection, fail_silently, None, None, using)
    return _mail_site_staff("MANAGERS", subject, message, priority, html_message, using)


def _check_arguments(
    function: str,
    connection: object,
    fail_silently: bool,
    auth_user: str | None,
    auth_password: str | None,
    using: str | None,
) -> None:
    """Warn about and refuse what Django's own ``function`` warns about and refuses, on this Django.

    Warnings name the caller of ``function`` (two frames up), as Django's do.
    """
    if not ARGUMENTS_DEPRECATED:
        if using is not None:
            raise TypeError(f"{function}() got an unexpected keyword argument 'using' (it needs Django 6.1)")
        return
    auth = auth_user is not None or auth_password is not None
    if fail_silently:
        warnings.warn(FAIL_SILENTLY_ARG_WARNING, DJANGO_DEPRECATION, stacklevel=3)
    if auth:
        warnings.warn(AUTH_ARGS_WARNING, DJANGO_DEPRECATION, stacklevel=3)
    if connection is not None:
        warnings.warn(CONNECTION_ARG_WARNING, DJANGO_DEPRECATION, stacklevel=3)
    if using is not None:
        if connection is not None:
            raise TypeError("'connection' is not compatible with 'using'.")
        if fail_silently:
            raise TypeError("'fail_silently' is not compatible with 'using'.")
        if auth:
            raise TypeError("'auth_user' and 'auth_password' are not compatible with 'using'.")
    elif connection is not None:
        if fail_silently:
            raise TypeError("fail_silently cannot be used with a connection.")
        if auth:
            raise TypeError("auth_user and auth_password cannot be used with a connection.")


def _queueing(priority: int | str | None, using: str | None) -> tuple[int, str | None]:
    """Return the priority to queue at and the ``MAILERS`` alias to queue through (None: no mailer).

    The priority is ``priority`` if given, else that of the mailer queued
    through. The mailer is ``using``, which must be a ``DbBackend`` mailer,
    or else the default mailer when it is one; Django makes it, so a wrong
    one raises here. Its alias is stored with the message, so that the
    message leaves through that mailer's ``deliver_using``.
    """
    if priority is not None:
        priority = get_priority(priority)
    queue = _queue_mailer(using)
    if queue is None:
        return get_priority(priority), None
    return (queue.priority if priority is None else priority), getattr(queue, "alias", None)


def _queue_mailer(using: str | None) -> "DbBackend | None":
    from mailer.backend import DbBackend
    from mailer.delivery import DEFAULT_MAILER, backend_path, is_queue, mailers_configured

    if using is None:
        if not mailers_configured() or DEFAULT_MAILER not in settings.MAILERS:
            return None
        if not is_queue(backend_path(DEFAULT_MAILER)):
            return None
        using = DEFAULT_MAILER

    from django.core.mail import mailers  # Django 6.1: _check_arguments refused ``using`` before it

    backend = mailers[using]
    if not isinstance(backend, DbBackend):
        raise ValueError(
            f"using={using!r} names a mailer that sends at once ({type(backend).__module__}."
            f"{type(backend).__qualname__}); mail is queued through a mailer.backend.DbBackend mailer."
        )
    return backend


def _queue(email: EmailMessage, priority: int, alias: str | None = None) -> int:
    """Queue ``email`` through the mailer ``alias``; return 1, or 0 (queueing nothing) when it has no recipients.

    Its addresses are checked first, so a ``None`` among the recipients is an
    error rather than a silently empty message.
    """
    from mailer.models import Message
    from mailer.signals import mail_queued

    using = Message.queue(email, priority, alias=alias)
    if using is None:
        return 0
    mail_queued.send(sender=Message, using=using, count=1)
    return 1


def _mail_site_staff(
    setting_name: str,
    subject: "str | Promise",
    message: "str | Promise",
    priority: int | str | None,
    html_message: "str | Promise | None",
    using: str | None,
) -> int:
    entries = getattr(settings, setting_name)
    if not entries:
        return 0
    if not isinstance(entries, (list, tuple)):
        raise ConfigurationError(f"The {setting_name} setting must be a list of email addresses.")
    recipients = []
    for entry in entries:
        # Django 6 writes ["a@example.com"]; earlier versions [("Name", "a@example.com")].
        # Both stay accepted: Django 6.0 deprecates the pairs in its own
        # mail_admins, but mailer's reads them as well as ever.
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            recipients.append(force_str(entry[1]))
        elif isinstance(entry, (str, Promise)):
            recipients.append(force_str(entry))
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
        html_message=html_message,
        using=using,
    )
