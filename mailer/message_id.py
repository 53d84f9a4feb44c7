"""The Message-ID header: how mailer finds it and when it sets it.

Every queued message gets its Message-ID when it is queued, so every attempt
and every log row of one message carries the same identifier.
"""

from typing import Any

from django.core.mail import EmailMessage, make_msgid
from django.core.mail.utils import DNS_NAME


def get_message_id(email: EmailMessage | None) -> str | None:
    """Return the Message-ID header of ``email``, or None; header names are case-insensitive."""
    if email is None:
        return None
    headers: dict[Any, Any] = email.extra_headers or {}
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "message-id":
            return str(value)
    return None


def ensure_message_id(email: EmailMessage) -> str:
    """Give ``email`` a Message-ID unless it has one, and return it."""
    message_id = get_message_id(email)
    if message_id is None:
        message_id = make_msgid(domain=DNS_NAME)
        email.extra_headers["Message-ID"] = message_id
    return message_id
