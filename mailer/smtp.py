"""Django's SMTP backend, keeping what the server said about each recipient.

Django's backend ignores the recipients a server refuses while it accepts
others: the message counts as sent and the refusals are lost. Queued mail
that Django's SMTP backend would deliver goes through this subclass
instead, which keeps them so that the log row of the message names them.
Nothing else changes.
"""

import smtplib
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.core.mail.message import sanitize_address

# Seconds before a silent mail server counts as down, when the site sets no
# timeout: without one, a server that accepts the connection and never
# answers would hold the sending process (and the lock) for ever.
DEFAULT_TIMEOUT = 60

Refusals = dict[str, tuple[int, bytes]]


class _KeepRefusals(smtplib.SMTP):
    refused: Refusals = {}

    def sendmail(self, from_addr: str, to_addrs: Any, msg: Any, *args: Any, **kwargs: Any) -> Refusals:
        self.refused = {}
        self.refused = super().sendmail(from_addr, _once_each(to_addrs), msg, *args, **kwargs)
        return self.refused


class _KeepRefusalsSSL(_KeepRefusals, smtplib.SMTP_SSL):
    pass


def _once_each(addresses: Any) -> Any:
    """Each envelope recipient once: named twice (in To and Cc, say), one could be accepted and the other refused."""
    if isinstance(addresses, str):
        return addresses
    return list(dict.fromkeys(addresses))


def _envelope_address(backend: DjangoSMTPBackend, recipient: str, encoding: str | None) -> str:
    """Return ``recipient`` as Django's SMTP backend gives it to the server (its address only, IDNA-encoded)."""
    prep_address = getattr(backend, "prep_address", None)
    if prep_address is not None:  # Django 6.0 and later
        return str(prep_address(recipient))
    return str(sanitize_address(recipient, encoding or settings.DEFAULT_CHARSET))


class EmailBackend(DjangoSMTPBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.timeout is None:
            self.timeout = DEFAULT_TIMEOUT

    @property
    def connection_class(self) -> type[smtplib.SMTP]:
        return _KeepRefusalsSSL if self.use_ssl else _KeepRefusals

    def send_messages(self, email_messages: Any) -> int:
        # What the server refused of the previous message is not this one's,
        # even if this one never reaches the server (no recipients).
        if isinstance(self.connection, _KeepRefusals):
            self.connection.refused = {}
        sent: int = super().send_messages(email_messages)
        return sent

    def refused_recipients(self, email: EmailMessage) -> Refusals:
        """Return the recipients of ``email`` that the server refused, as ``email`` names them, with its reply to each.

        ``email`` is the message just sent. A recipient named twice is named once.
        """
        refused: Refusals = getattr(self.connection, "refused", {})
        if not refused:  # the usual case: no need to work out each recipient's envelope address
            return {}
        named: Refusals = {}
        seen = set()
        for recipient in email.recipients():
            envelope = _envelope_address(self, recipient, email.encoding)
            if envelope in refused and envelope not in seen:
                seen.add(envelope)
                named[recipient] = refused[envelope]
        return named
