"""Checking addresses when mail is queued, as the delivering backend will.

Django builds an ``EmailMessage`` from almost any strings and only its SMTP
backend, at send time, refuses an address it cannot deliver to. In a queue
that is too late: the error would land in the cron job, far from the code
that made the mistake. So every address is checked when the message is
queued, and a bad one is refused there, naming the field.
"""

from collections.abc import Iterable
from email.headerregistry import AddressHeader
from typing import Any

from django.core.mail import EmailMessage

from mailer.exceptions import InvalidAddress

ENVELOPE_FIELDS = ("to", "cc", "bcc")

# Django accepts a local mailbox such as "webmaster" as a sender (#15042).
ALLOWED_DEFECTS = {"addr-spec local part with no domain"}


def check_addresses(email: EmailMessage) -> None:
    """Raise InvalidAddress, naming the field, unless every address of ``email`` can be delivered.

    The sender and the recipients go into the SMTP envelope, one address
    each; Reply-To is only a header, so it need only be text without a line
    break (a group, or several addresses in one entry, are fine there).
    """
    check_address(email.from_email, "from_email")
    for field in ENVELOPE_FIELDS:
        for index, address in enumerate(_as_list(getattr(email, field), field)):
            if address != "":  # Django skips empty strings, and so does delivery
                check_address(address, f"{field}[{index}]")
    for index, address in enumerate(_as_list(email.reply_to, "reply_to")):
        if not isinstance(address, str):
            raise InvalidAddress(f"reply_to[{index}] is {address!r}, not an email address")
        if "\r" in address or "\n" in address:
            raise InvalidAddress(f"reply_to[{index}] contains a line break: {address!r}")


def check_address(address: Any, where: str) -> None:
    """Raise InvalidAddress unless ``address`` is one address that SMTP can carry."""
    if not isinstance(address, str):
        raise InvalidAddress(f"{where} is {address!r}, not an email address")
    if "\r" in address or "\n" in address:
        raise InvalidAddress(f"{where} contains a line break: {address!r}")
    parsed = AddressHeader.value_parser(address)
    for mailbox in parsed.all_mailboxes:
        # The parser leaves them None (typeshed says str) for "<>", "a@b@c", "a@x..y".
        local_part: str | None = mailbox.local_part
        domain: str | None = mailbox.domain
        if local_part is None or (domain is None and "@" in address):
            raise InvalidAddress(f"{where} is not a valid address: {address!r}")
        if not local_part.isascii():
            raise InvalidAddress(f"{where} has a non-ASCII part before the @, which SMTP cannot carry: {address!r}")
    defects = sorted({str(defect) for defect in parsed.all_defects} - ALLOWED_DEFECTS)
    if defects:
        raise InvalidAddress(f"{where} is not a valid address: {address!r} ({'; '.join(defects)})")
    mailboxes = parsed.all_mailboxes
    if len(mailboxes) != 1:
        raise InvalidAddress(f"{where} must be one address, not {address!r}")
    mailbox = mailboxes[0]
    if mailbox.domain and not mailbox.domain.isascii():
        try:
            mailbox.domain.encode("idna")
        except UnicodeError as exc:
            raise InvalidAddress(f"{where} has a domain that cannot be written in ASCII: {address!r}") from exc


def _as_list(value: Any, field: str) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        return value
    raise InvalidAddress(f"{field} must be a list or tuple of addresses, not {type(value).__name__}")
