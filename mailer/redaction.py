"""What mailer may write about a message when ``MAILER_EMAIL_LOG_MESSAGE_DATA`` is off.

With the setting off, the log keeps no content, and the addresses and the
subject of a message are blanked out of every text mailer writes or raises
(mail servers name addresses in their errors): its log rows, its log lines,
and the exceptions it raises again. Everything that writes such a text asks
``loggable``; this module is the whole policy.
"""

import contextlib
import re
from email.header import Header
from email.utils import getaddresses, parseaddr
from typing import Any, Protocol

from mailer import conf

REDACTED = "<redacted>"

# Headers of ``extra_headers`` that hold addresses.
ADDRESS_HEADERS = {"from", "sender", "reply-to", "to", "cc", "bcc", "return-path"}

# A display name shorter than this identifies nobody, and would blank out
# ordinary words.
SHORTEST_NAME = 3


class Searchable(Protocol):
    """What redaction needs of a queued message: its searchable columns and its email."""

    @property
    def subject(self) -> str | None: ...

    @property
    def from_email(self) -> str | None: ...

    @property
    def recipients(self) -> str | None: ...

    @property
    def email(self) -> Any: ...


def keeps_message_data() -> bool:
    """Return whether the site lets mailer keep and log message content."""
    return bool(conf.get_setting("MAILER_EMAIL_LOG_MESSAGE_DATA"))


def address_of(recipient: str) -> str:
    """Return the bare, lower-cased address in ``recipient`` ("Name <a@b>" or "a@b")."""
    return (parseaddr(recipient)[1] or recipient).lower()


# Anything shaped like an address, in text that does not parse as one.
ADDRESS_LIKE = re.compile(r"[^\s<>(),;:\"']+@[^\s<>(),;:\"']+")


def secrets_of(message: Searchable) -> set[str]:
    """Return every form in which the addresses, names and subject of ``message`` may appear in a text.

    They are read from the stored email as well as from the search columns,
    which are empty for a row no version of mailer has saved yet. Each text
    is read on its own, so one that does not parse costs nothing else.
    """
    subjects = [message.subject]
    address_texts = [message.from_email, message.recipients]
    try:
        email = message.email
    except Exception:  # an unreadable row: its columns are all there is
        email = None
    if email is not None and hasattr(email, "extra_headers"):
        subjects.append(getattr(email, "subject", None))
        address_texts.append(getattr(email, "from_email", None))
        for field in ("to", "cc", "bcc", "reply_to"):
            address_texts.extend(getattr(email, field, None) or [])
        headers = email.extra_headers if isinstance(email.extra_headers, dict) else {}
        subjects.extend(value for name, value in headers.items() if str(name).lower() == "subject")
        address_texts.extend(value for name, value in headers.items() if str(name).lower() in ADDRESS_HEADERS)
    secrets: set[str] = set()
    for subject in filter(None, subjects):
        secrets.update(_subject_forms(str(subject)))
    for text in filter(None, address_texts):
        secrets.update(_address_forms(str(text)))
    return secrets


def _subject_forms(subject: str) -> set[str]:
    """The subject as written, and the encoded words and folded lines it becomes in a message's header."""
    forms = {subject, *(line.strip() for line in subject.splitlines())}
    with contextlib.suppress(Exception):  # no charset can write it: it cannot be sent either
        encoded = Header(subject, "utf-8").encode()
        forms.update(word for word in encoded.split() if len(word) >= 8)
    return {form for form in forms if form}


def _address_forms(text: str) -> set[str]:
    """Each address in ``text``: as written, its display name, and the forms a mail server reports.

    What does not parse as addresses is taken as it is, with anything in it
    shaped like an address.
    """
    forms = set(ADDRESS_LIKE.findall(text))
    pairs = getaddresses([text])
    if pairs == [("", "")]:
        forms.add(text)  # Python refuses to guess at it: take it all
        pairs = []
    for name, address in pairs:
        if len(name) >= SHORTEST_NAME:
            forms.add(name)
        if address:
            forms.add(address)
    for address in list(forms):
        local, _, domain = address.rpartition("@")
        if local and domain:
            with contextlib.suppress(UnicodeError):  # not a domain IDNA can write
                # What a mail server reports for an international domain; and
                # the encoded word Django 5.2 makes of a non-ASCII local part.
                ascii_domain = domain.encode("idna").decode("ascii")
                forms.add(f"{local}@{ascii_domain}")
                if not local.isascii():
                    forms.add(f"{Header(local, 'utf-8').encode()}@{ascii_domain}")
    return forms


def redact(text: str, message: Searchable) -> str:
    """Blank every address, display name and subject of ``message`` out of ``text``, in any letter case."""
    secrets = sorted(secrets_of(message), key=len, reverse=True)
    if not text or not secrets:
        return text
    pattern = "|".join(re.escape(secret) for secret in secrets)
    return re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)


def loggable(text: str, message: Searchable) -> str:
    """Return ``text`` fit to be logged: redacted unless message data may be logged."""
    if keeps_message_data():
        return text
    return redact(text, message)
