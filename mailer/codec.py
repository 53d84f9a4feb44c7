"""How a message is stored in ``message_data``.

django-mailer 2.x stores the pickled ``EmailMessage``, base64-encoded so it
fits a text column; releases before 2.0 stored the raw pickle. Both are read
here, and nowhere else knows the format.
"""

import base64
import binascii
import pickle
from typing import Any

from django.core.mail import EmailAlternative, EmailAttachment, EmailMessage


def email_to_db(email: Any) -> str:
    """Encode ``email`` as text for the ``message_data`` column."""
    return base64.encodebytes(pickle.dumps(email)).decode("ascii")


def db_to_email(data: str | bytes | None) -> Any:
    """Decode ``message_data``; return None when there is nothing to decode or it is unreadable."""
    value = _unpickle(data)
    if isinstance(value, EmailMessage):
        _upgrade_parts(value)
    return value


def _upgrade_parts(email: EmailMessage) -> None:
    """Turn the plain tuples of messages pickled before Django 5.2 into the named tuples Django now expects."""
    if getattr(email, "alternatives", None):
        email.alternatives = [
            EmailAlternative(*item) if type(item) is tuple else item for item in email.alternatives
        ]
    if getattr(email, "attachments", None):
        email.attachments = [
            EmailAttachment(*item) if type(item) is tuple else item for item in email.attachments
        ]


def _unpickle(data: str | bytes | None) -> Any:
    if not data:
        return None
    raw = data.encode("ascii", "surrogateescape") if isinstance(data, str) else data
    try:
        return pickle.loads(base64.decodebytes(raw))
    except (binascii.Error, pickle.UnpicklingError, TypeError, ValueError, AttributeError, EOFError, ImportError):
        pass
    try:
        # Before django-mailer 2.0 the pickle itself was stored.
        return pickle.loads(raw)
    except (pickle.UnpicklingError, TypeError, ValueError, AttributeError, EOFError, ImportError, KeyError):
        return None
