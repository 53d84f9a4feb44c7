"""What mailer may write about a message when ``MAILER_EMAIL_LOG_MESSAGE_DATA`` is off.

With the setting off, the log keeps no content, and the addresses and the
subject of a message are blanked out of the texts mailer writes (mail
servers name addresses in their errors). Everything that writes such a text
asks ``loggable``.
"""

import re
from email.utils import parseaddr
from typing import Protocol

from mailer import conf

REDACTED = "<redacted>"


class Searchable(Protocol):
    """What redaction needs of a queued message: its searchable columns."""

    subject: str
    recipients: str


def keeps_message_data() -> bool:
    """Return whether the site lets mailer keep and log message content."""
    return bool(conf.get_setting("MAILER_EMAIL_LOG_MESSAGE_DATA"))


def address_of(recipient: str) -> str:
    """Return the bare, lower-cased address in ``recipient`` ("Name <a@b>" or "a@b")."""
    return (parseaddr(recipient)[1] or recipient).lower()


def redact(text: str, message: Searchable) -> str:
    """Blank the recipients' addresses and the subject of ``message`` out of ``text``."""
    secrets = [address_of(r) for r in (message.recipients or "").split(", ") if r] + [message.subject]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    return text


def loggable(text: str, message: Searchable) -> str:
    """Return ``text`` fit to be logged: redacted unless message data may be logged."""
    if keeps_message_data():
        return text
    return redact(text, message)
