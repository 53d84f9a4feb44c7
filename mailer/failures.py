"""What a delivery error means: try again later, give up, or stop the pass.

Mail servers say which failures are worth another try: a 4xx reply is
temporary, a 5xx reply is final. An error that says the server cannot be
reached at all (refused or timed-out connections, failed logins) is
temporary too, but it also says that every other message of the pass would
fail the same way, after waiting the same timeout: the pass ends there.
"""

import smtplib
from collections.abc import Mapping
from dataclasses import dataclass

# Replies that say the client may not send at all (authentication required,
# refused or unavailable): every message would get the same.
AUTHENTICATION_CODES = {530, 534, 535, 538, 454}

# Errors that say the server, not the message, is the problem.
OUTAGE_ERRORS = (
    smtplib.SMTPConnectError,
    smtplib.SMTPHeloError,
    smtplib.SMTPAuthenticationError,
    smtplib.SMTPServerDisconnected,
    smtplib.SMTPNotSupportedError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class Failure:
    """One delivery error, understood."""

    reason: str
    # The server refused for good (5xx): trying again cannot help.
    permanent: bool = False
    # The server cannot be reached or refuses every session: end the pass.
    outage: bool = False


def understand(exc: BaseException, *, while_connecting: bool = False) -> Failure:
    """Return what ``exc``, raised while delivering a message, means for the message and the pass.

    Anything raised ``while_connecting`` (before a message was offered) is an
    outage, whatever its type: no message of the pass can get through.
    """
    reason = describe(exc)
    if while_connecting or isinstance(exc, OUTAGE_ERRORS):
        return Failure(reason, outage=True)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _reply in exc.recipients.values()]
        if any(code == 421 or code in AUTHENTICATION_CODES for code in codes):
            return Failure(reason, outage=True)  # the session is over, or will never be let in
        return Failure(reason, permanent=bool(codes) and all(is_permanent(code) for code in codes))
    if isinstance(exc, smtplib.SMTPResponseException):
        if exc.smtp_code == 421 or exc.smtp_code in AUTHENTICATION_CODES:
            # The server is closing the session (going away, overloaded), or
            # will not take mail from this client at all.
            return Failure(reason, outage=True)
        return Failure(reason, permanent=is_permanent(exc.smtp_code))
    return Failure(reason)


def is_permanent(smtp_code: int) -> bool:
    """Return whether an SMTP reply code refuses for good (5xx)."""
    return 500 <= smtp_code < 600


def describe(exc: BaseException) -> str:
    """Return the error as the log shows it: the server's replies in full, one per refused recipient."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "recipients refused: " + describe_refusals(exc.recipients)
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"sender {exc.sender} refused: {exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{type(exc).__name__}: {exc.smtp_code} {_text(exc.smtp_error)}"
    return f"{type(exc).__name__}: {exc}"


def describe_refusals(refused: Mapping[str, tuple[int, bytes | str]]) -> str:
    """Return ``refused`` (recipient: (code, reply), as smtplib reports it) as one line."""
    return "; ".join(f"{recipient}: {code} {_text(reply)}" for recipient, (code, reply) in refused.items())


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)
