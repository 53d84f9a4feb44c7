"""Django's SMTP backend, keeping what the server said about each recipient.

Django's backend ignores the recipients a server refuses while it accepts
others: the message counts as sent and the refusals are lost. Queued mail
that Django's SMTP backend would deliver goes through this subclass
instead, which keeps them so that the log row of the message names them.
Nothing else changes.
"""

import smtplib
from typing import Any

from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend

# Seconds before a silent mail server counts as down, when the site sets no
# timeout: without one, a server that accepts the connection and never
# answers would hold the sending process (and the lock) for ever.
DEFAULT_TIMEOUT = 60

Refusals = dict[str, tuple[int, bytes]]


class _KeepRefusals(smtplib.SMTP):
    refused: Refusals = {}

    def sendmail(self, *args: Any, **kwargs: Any) -> Refusals:
        self.refused = {}
        self.refused = super().sendmail(*args, **kwargs)
        return self.refused


class _KeepRefusalsSSL(smtplib.SMTP_SSL):
    refused: Refusals = {}

    def sendmail(self, *args: Any, **kwargs: Any) -> Refusals:
        self.refused = {}
        self.refused = super().sendmail(*args, **kwargs)
        return self.refused


class EmailBackend(DjangoSMTPBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.timeout is None:
            self.timeout = DEFAULT_TIMEOUT

    @property
    def connection_class(self) -> type[smtplib.SMTP]:
        return _KeepRefusalsSSL if self.use_ssl else _KeepRefusals

    def refused_recipients(self) -> Refusals:
        """Return the recipients refused in the last message sent, with the server's reply to each."""
        return dict(getattr(self.connection, "refused", {}))
