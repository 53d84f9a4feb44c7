"""Every exception mailer raises, under one base, ``MailerError``.

Configuration errors are also Django's ``ImproperlyConfigured`` (and, for a
``MAILERS`` entry on Django 6.1, its ``InvalidMailer``), so code that already
catches those keeps working. Storage errors are also ``ValueError``: they say
that a value given to mailer cannot be stored or read back. So are a bad
address or header given to queue a message (a header error is also Django's
``BadHeaderError``, which Django raises for a header it refuses).
"""

from django.core.exceptions import ImproperlyConfigured

try:
    from django.core.mail.exceptions import InvalidMailer
except ImportError:  # Django < 6.1 has no MAILERS setting, hence no InvalidMailer.
    InvalidMailer = ImproperlyConfigured  # type: ignore[assignment,misc]

try:
    from django.core.mail.message import BadHeaderError
except ImportError:  # Django 6 keeps it only as a deprecated alias of ValueError.
    BadHeaderError = ValueError  # type: ignore[assignment,misc]


class MailerError(Exception):
    """The base of every exception mailer raises."""


class ConfigurationError(MailerError, ImproperlyConfigured):
    """Mailer's settings do not make sense; the message says which and why.

    ``check_id`` is the id of the system check that reports the same problem
    (``manage.py check``), and ``hint`` what to change; see ``mailer.checks``.
    """

    def __init__(self, msg: str, *, check_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg)
        self.check_id = check_id
        self.hint = hint


class InvalidMailerEntry(ConfigurationError, InvalidMailer):
    """A ``MAILERS`` entry that mailer uses is wrong; the message starts with its alias, as Django's do."""

    def __init__(
        self, msg: str, *, alias: str | None = None, check_id: str | None = None, hint: str | None = None
    ) -> None:
        if alias is not None:
            msg = f"MAILERS[{alias!r}]: {msg}"
        ConfigurationError.__init__(self, msg, check_id=check_id, hint=hint)
        self.alias = alias


class InvalidDeliveryMailer(InvalidMailerEntry):
    """The ``MAILERS`` entry that should deliver queued mail is missing or unusable."""


class InvalidAddress(MailerError, ValueError):
    """An address given to queue a message cannot be delivered; raised when it is queued, naming the field."""


class InvalidHeader(MailerError, BadHeaderError):
    """An extra header given to queue a message cannot be sent as given; raised when it is queued, naming the header.

    It is Django's ``BadHeaderError`` (a ``ValueError``; on Django 6.1 that
    name is ``ValueError`` itself), which Django raises for a line break in a
    header value: code that catches it keeps catching this.
    """


class UnstorableEmail(MailerError, ValueError):
    """A message holds something that cannot be stored exactly; raised when it is queued."""


class UndecodableData(MailerError, ValueError):
    """``message_data`` cannot be turned back into a message; the text says why."""


class RefusedPickle(UndecodableData):
    """A legacy pickle asks for something an email is not made of."""


class SentButNotRecorded(MailerError):
    """A message went out but its log row and deletion could not be written."""
