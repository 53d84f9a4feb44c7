"""With ``MAILER_EMAIL_LOG_MESSAGE_DATA = False``, no address, display name or subject of a message is written anywhere.

Real refusals from a real SMTP server, whose replies name the addresses as
mail servers do, are sent through a real pass. Then every place mailer
writes is read: the MessageLog columns, ``log_message``, the records of
mailer's loggers at every level, and the text of whatever mailer raises
(with its ``__cause__`` and ``__context__``). With the setting on (the
default) the same events keep the addresses: that is what makes the
redacted runs mean something.
"""

import base64
import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from hypothesis import given
from hypothesis import strategies as st

from mailer import engine
from mailer.exceptions import InvalidAddress
from mailer.failures import describe_refusals
from mailer.models import PRIORITY_DEFERRED, RESULT_FAILURE, Message, MessageLog
from mailer.redaction import REDACTED, addresses_like, fold_case, loggable, redact, secrets_of
from tests.alarms import time_limit
from tests.smtp import SMTPServer

pytestmark = pytest.mark.django_db


@dataclass
class Scenario:
    """A message, how the server refuses it, and every form of its secrets that must not be written."""

    email: EmailMessage
    refuse: Callable[[SMTPServer], None]  # tells the server how to refuse it
    secrets: list[str]
    # The form in which the server's reply names the message when nothing is redacted.
    shown: str
    legacy: bool = False
    extra: dict = field(default_factory=dict)


def email(subject="Quarterly figures", to=("ada@example.com",), **kwargs) -> EmailMessage:
    kwargs.setdefault("from_email", "sender@example.com")
    return EmailMessage(subject, "Body", to=list(to), **kwargs)


def sender_refused() -> Scenario:
    return Scenario(
        email(from_email="Sender Person <sender@example.com>"),
        lambda server: server.reject_sender(
            "sender@example.com", "550 5.7.1 <sender@example.com> (Sender Person): sender address rejected"
        ),
        ["sender@example.com", "Sender Person"],
        "sender@example.com",
    )


def idn_recipient_refused() -> Scenario:
    # The server sees (and names) the punycode form Django sends.
    return Scenario(
        email(to=["john@exämple.com"]),
        lambda server: server.reject_recipient(
            "john@xn--exmple-cua.com", "550 5.1.1 <john@xn--exmple-cua.com>: recipient address rejected"
        ),
        ["john@exämple.com", "john@xn--exmple-cua.com"],
        "john@xn--exmple-cua.com",
    )


def idn_local_part_refused() -> Scenario:
    """An address international in its local part too, in a row django-mailer queued (mailer refuses to queue one).

    Django 5.2 hands smtplib the address with the local part as an RFC 2047
    encoded word, and smtplib names the refused recipients as it was given
    them.
    """
    encoded = "=?utf-8?b?asO2aG4=?=@xn--exmple-cua.com"
    return Scenario(
        email(to=["jöhn@exämple.com"], headers={"Message-ID": "<idn@example.com>"}),
        lambda server: server.reject_recipient("jöhn@xn--exmple-cua.com", "550 5.1.1 recipient address rejected"),
        ["jöhn@exämple.com", "jöhn@xn--exmple-cua.com", encoded],
        encoded,
        legacy=True,
    )


def named_recipient_refused() -> Scenario:
    return Scenario(
        email(to=["Ada Lovelace <ada@example.com>"]),
        lambda server: server.reject_recipient(
            "ada@example.com", "550 5.1.1 <ada@example.com> (Ada Lovelace): no such user"
        ),
        ["ada@example.com", "Ada Lovelace"],
        "ada@example.com",
    )


def non_ascii_name_refused() -> Scenario:
    """Django 5.2 hands smtplib the recipient with its display name, which smtplib names as an encoded word."""
    return Scenario(
        email(to=["Jürgen Groß <juergen@example.com>"]),
        lambda server: server.reject_recipient("juergen@example.com", "550 5.1.1 <juergen@example.com>: no such user"),
        ["juergen@example.com", "Jürgen Groß", "=?utf-8?b?SsO8cmdlbiBHcm/Dnw==?="],
        "juergen@example.com",
    )


def reply_to_refused() -> Scenario:
    """The server refuses the content, naming the Reply-To address and the subject."""
    return Scenario(
        email(subject="Salary review 2026", reply_to=["help.desk@example.com"]),
        lambda server: server.reply_to_data(
            "554 5.7.1 Reply-To <help.desk@example.com> of 'Salary review 2026' is not allowed"
        ),
        ["help.desk@example.com", "Salary review 2026"],
        "help.desk@example.com",
    )


def other_case_refused() -> Scenario:
    """The address queued in mixed case; the server answers in upper case."""
    return Scenario(
        email(to=["Grace.Hopper@Example.com"]),
        lambda server: server.reject_recipient(
            "Grace.Hopper@Example.com", "550 5.1.1 <GRACE.HOPPER@EXAMPLE.COM>: no such user"
        ),
        ["grace.hopper@example.com"],
        "GRACE.HOPPER@EXAMPLE.COM",
    )


def legacy_row_refused() -> Scenario:
    """A row django-mailer pickled: its search columns are empty, so the email itself says what to blank out."""
    message = email(
        subject="Legacy secret subject",
        to=["Legacy User <legacy.user@example.com>"],
        headers={"Message-ID": "<legacy@example.com>"},
    )
    return Scenario(
        message,
        lambda server: server.reject_recipient(
            "legacy.user@example.com", "550 5.1.1 <legacy.user@example.com> (Legacy User): gone"
        ),
        ["legacy.user@example.com", "Legacy User"],
        "legacy.user@example.com",
        legacy=True,
    )


SCENARIOS = {
    "sender-refused": sender_refused,
    "idn-recipient-refused": idn_recipient_refused,
    "named-recipient-refused": named_recipient_refused,
    "non-ascii-name-refused": non_ascii_name_refused,
    "reply-to-and-subject-in-reply": reply_to_refused,
    "other-letter-case": other_case_refused,
    "legacy-row-with-empty-columns": legacy_row_refused,
}


def queue(scenario: Scenario) -> Message:
    if scenario.legacy:
        data = base64.encodebytes(pickle.dumps(scenario.email)).decode("ascii")
        # As django-mailer left it: inserted without save(), so no search column is filled.
        (row,) = Message.objects.bulk_create([Message(message_data=data)])
        message = Message.objects.get(pk=row.pk)
        assert (message.subject_copy, message.from_email, message.recipients) == ("", "", "")
        return message
    message = Message.for_email(scenario.email)
    message.save()
    return message


def written_texts(caplog) -> list[str]:
    """Every text mailer wrote: its log rows (every column) and its log records (every level)."""
    texts = []
    for log in MessageLog.objects.all():
        texts += [log.log_message, log.subject_copy, log.from_email, log.recipients, log.message_data]
    for record in caplog.records:
        if record.name == "mailer" or record.name.startswith("mailer."):
            texts.append(record.getMessage())
            if record.exc_info:
                texts.append(logging.Formatter().formatException(record.exc_info))
    return [text for text in texts if text]


def found(secret: str, texts: list[str]) -> list[str]:
    return [text for text in texts if secret.lower() in text.lower()]


@pytest.fixture
def mailer_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="mailer")
    return caplog


@pytest.mark.parametrize("name", SCENARIOS)
def test_with_message_data_off_a_refusal_names_nobody_anywhere(name, settings, deliver_to_smtp, mailer_logs):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    scenario = SCENARIOS[name]()
    scenario.refuse(deliver_to_smtp)
    message = queue(scenario)

    assert engine.send_all() == {"failed": 1}  # every scenario is refused for good (5xx)

    message.refresh_from_db()
    assert message.priority == PRIORITY_DEFERRED and message.failed_permanently
    log = MessageLog.objects.get()
    assert (log.result, log.subject, log.from_email, log.recipients, log.message_data) == (
        RESULT_FAILURE,
        None,
        None,
        None,
        None,
    )
    # The server's reply is there, with the secrets blanked out.
    assert REDACTED in log.log_message
    assert "550" in log.log_message or "554" in log.log_message
    texts = written_texts(mailer_logs)
    for secret in scenario.secrets:
        assert found(secret, texts) == [], f"{secret!r} was written"


@pytest.mark.parametrize("name", SCENARIOS)
def test_with_message_data_on_the_same_refusal_keeps_the_addresses(name, settings, deliver_to_smtp, mailer_logs):
    """The control: the redacted run above would pass for nothing if the address never reached the log."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = True
    scenario = SCENARIOS[name]()
    scenario.refuse(deliver_to_smtp)
    message = queue(scenario)

    assert engine.send_all() == {"failed": 1}

    log = MessageLog.objects.get()
    assert scenario.shown in log.log_message
    assert log.message_data == Message.objects.get(pk=message.pk).message_data
    assert found(scenario.shown, [r.getMessage() for r in mailer_logs.records if r.name.startswith("mailer")])
    assert REDACTED not in log.log_message


class HandlerGaveUp(Exception):
    pass


def raising_error_handler(connection, message, exc):
    """A site's MAILER_ERROR_HANDLER that gives up, saying what it was given (as handlers do)."""
    raise HandlerGaveUp(f"cannot handle {exc}")


@pytest.mark.parametrize("name", ["named-recipient-refused", "legacy-row-with-empty-columns"])
def test_an_error_handler_that_raises_names_nobody(name, settings, deliver_to_smtp, mailer_logs):
    """Its error (which quotes the server's reply) is logged with the message set aside, blanked out."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    settings.MAILER_ERROR_HANDLER = f"{__name__}.raising_error_handler"
    scenario = SCENARIOS[name]()
    scenario.refuse(deliver_to_smtp)
    queue(scenario)

    assert engine.send_all() == {"deferred": 1}

    assert re.search(r"HandlerGaveUp: cannot handle .*<redacted>", MessageLog.objects.get().log_message)
    texts = written_texts(mailer_logs)
    for secret in scenario.secrets:
        assert found(secret, texts) == [], f"{secret!r} was written"
    assert Message.objects.get().priority == PRIORITY_DEFERRED


def test_with_message_data_on_the_error_of_the_handler_is_logged_as_it_was(settings, deliver_to_smtp, mailer_logs):
    settings.MAILER_ERROR_HANDLER = f"{__name__}.raising_error_handler"
    scenario = named_recipient_refused()
    scenario.refuse(deliver_to_smtp)
    queue(scenario)

    engine.send_all()

    assert "MAILER_ERROR_HANDLER raised HandlerGaveUp: cannot handle" in MessageLog.objects.get().log_message
    [error] = [r for r in mailer_logs.records if r.levelno == logging.ERROR]
    assert "ada@example.com" in error.getMessage()
    assert error.exc_info is not None  # with the traceback, which may quote addresses only when that is allowed


# Django 6 checks each envelope address itself (prep_address) and refuses a
# non-ASCII local part; Django 5.2 sends it as an RFC 2047 encoded word.
DJANGO_CHECKS_ENVELOPE = hasattr(SMTPBackend, "prep_address")


def test_an_address_with_a_non_ascii_local_part_names_nobody(settings, deliver_to_smtp, mailer_logs):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    scenario = idn_local_part_refused()
    scenario.refuse(deliver_to_smtp)
    queue(scenario)

    counts = engine.send_all()

    if DJANGO_CHECKS_ENVELOPE:
        assert counts == {"deferred": 1}  # Django refused the address: a ValueError, set aside
        assert "ValueError: Invalid address '<redacted>'" in MessageLog.objects.get().log_message
    else:
        assert counts == {"failed": 1}  # the server refused it for good
    texts = written_texts(mailer_logs)
    assert Message.objects.get().priority == PRIORITY_DEFERRED
    for secret in scenario.secrets:
        assert found(secret, texts) == [], f"{secret!r} was written"


@pytest.mark.parametrize(
    "sender, recipients, secret_forms",
    [
        ("f@example.com", ['"Doe, John" <john@example.com>', "bob@example.com"], ["john@example.com", "Doe, John"]),
        ("refuse-sender@example.com (Doe, John)", ["bob@example.com"], ["refuse-sender@example.com"]),
        ("f@example.com", ["x@[127.0.0.1]", "bob@example.com"], ["x@[127.0.0.1]", "bob@example.com"]),
        ("f@example.com", ["bob@example.com, carol@example.com"], ["bob@example.com", "carol@example.com"]),
    ],
    ids=["quoted comma", "comment with a comma", "IP literal", "two in one (a legacy row)"],
)
def test_addresses_that_do_not_parse_together_are_each_redacted(sender, recipients, secret_forms):
    """One address that Python will not split cleanly must not switch redaction off for the others."""
    message = Message(priority=PRIORITY_DEFERRED)
    message.email = EmailMessage("Subject", "Body", sender, recipients)
    server_reply = f"{{'{recipients[0]}': (550, b'5.1.1 <{secret_forms[0]}> ({secret_forms[-1]}): no such user')}}"

    redacted = redact(server_reply + " from " + sender, message)

    for secret in secret_forms + ["bob@example.com"]:
        assert secret.lower() not in redacted.lower(), redacted
    assert "<redacted>" in redacted


def test_the_subject_is_redacted_in_its_encoded_form_too():
    """A server quoting the Subject header shows it as encoded words, and folded."""
    from email.header import Header

    subject = "Grüße an Jürgen, mit einem langen Betreff, der gefaltet wird, weil er so lang ist"
    message = Message(priority=PRIORITY_DEFERRED)
    message.email = EmailMessage(subject, "Body", "f@example.com", ["t@example.com"])
    quoted = "550 rejected: Subject: " + Header(subject, "utf-8").encode()

    redacted = redact(quoted, message)

    assert "=?utf-8?" not in redacted, redacted


# Redaction used to take time in proportion to the square of these sizes:
# minutes, each time it ran. The limits below are many times what it takes
# now, and still far less than it took then.
LONG_NAME = '"é' + "x" * 200_000 + '" <visitor@example.com>'
MANY = 20_000


def queued(subject="Quarterly figures", to=(), bcc=()) -> Message:
    message = Message(priority=PRIORITY_DEFERRED)
    message.email = EmailMessage(subject, "Body", "f@example.com", to=list(to), bcc=list(bcc))
    return message


def test_a_long_display_name_is_redacted_in_time(settings):
    """A display name is a long run without "@": finding addresses must not try it from each of its characters."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    message = queued(to=[LONG_NAME])
    reply = f"550 5.1.1 <visitor@example.com>: no such user; To: {LONG_NAME}"

    with time_limit(20):
        logged = loggable(reply, message)

    assert logged == '550 5.1.1 <<redacted>>: no such user; To: "<redacted>" <<redacted>>'


def refusals(count: int) -> dict[str, tuple[int, bytes]]:
    """What smtplib reports when the server refuses ``count`` recipients, naming each with the display name queued."""
    return {
        f"reader{i}@example.com": (550, f"5.1.1 <reader{i}@example.com> (Reader {i}): no such user".encode())
        for i in range(count)
    }


def test_a_refusal_of_many_recipients_is_redacted_in_time():
    """A newsletter refused recipient by recipient: thousands of secrets, all in one text."""
    message = queued(to=[f"Reader {i} <reader{i}@example.com>" for i in range(MANY)])
    note = "recipients refused: " + describe_refusals(refusals(MANY))

    with time_limit(20):
        redacted = redact(note, message)

    # "Reader 1" is a name too: the longest name is blanked out, not its start.
    refusal = "<redacted>: 550 5.1.1 <<redacted>> (<redacted>): no such user"
    assert redacted == "recipients refused: " + "; ".join([refusal] * MANY)


def test_a_recipient_with_a_long_display_name_is_refused_in_time(settings, deliver_to_smtp, mailer_logs):
    """One message must not hold up the queue, nor its name be written: queueing refuses such an address at once,
    and a row that holds one (assigned to a row, as django-mailer allowed) is set aside when read."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    with time_limit(5), pytest.raises(InvalidAddress, match="to has an address longer than 998 characters"):
        Message.for_email(EmailMessage("Quarterly figures", "Body", "f@example.com", [LONG_NAME]))
    row = Message(message_data="")
    row.email = EmailMessage("Quarterly figures", "Body", "f@example.com", [LONG_NAME])
    row.save()

    with time_limit(30):
        assert engine.send_all() == {"deferred": 1}

    reason = "message data is damaged: to has an address longer than 998 characters"
    assert MessageLog.objects.get().log_message == reason
    texts = written_texts(mailer_logs)
    for secret in ["visitor@example.com", "x" * 20, "=?utf-8?"]:
        assert found(secret, texts) == [], f"{secret!r} was written"


def test_many_refused_recipients_are_logged_in_time(settings, deliver_to_smtp, mailer_logs):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    count = 10_000  # fewer than MANY: the server refuses each in a round trip of its own
    recipients = [f"reader{i}@example.com" for i in range(count)]
    for recipient in recipients:
        deliver_to_smtp.reject_recipient(recipient, f"550 5.1.1 <{recipient}>: no such user")
    Message.for_email(EmailMessage("Quarterly figures", "Body", "f@example.com", bcc=recipients)).save()

    with time_limit(60):
        assert engine.send_all() == {"failed": 1}

    refusal = "<redacted>: 550 5.1.1 <<redacted>>: no such user"
    assert MessageLog.objects.get().log_message == "recipients refused: " + "; ".join([refusal] * count)
    assert found("reader1@example.com", written_texts(mailer_logs)) == []


@dataclass
class Queued:
    """A queued message as redaction sees it, with no email to read."""

    subject_copy: str | None
    from_email: str | None
    recipients: str | None
    email: None = None


def redacted_by_one_expression(text: str, secrets: set[str]) -> str:
    """What redaction did before it was made fast: one regular expression of the secrets, longest first."""
    if not secrets:
        return text
    pattern = "|".join(re.escape(secret) for secret in sorted(secrets, key=len, reverse=True))
    return re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)


# Addresses, what ends them, and the letters whose case is odd: "İ" and "ı",
# "ſ" (an s), the Kelvin sign, "ß", sigmas, micro and mu, two forms of "ΐ".
LETTERS = "aAbB@.<>\", ;:()'xX\nİıiIſsSKk\u212aßẞΣσςµμé\u0390\u1fd3"
pieces = st.text(alphabet=LETTERS, max_size=8)


@given(pieces, pieces, st.lists(pieces, max_size=3), st.data())
def test_redaction_blanks_out_what_one_expression_of_the_secrets_does(subject, sender, recipients, data):
    message = Queued(subject, sender, ", ".join(recipients))
    secrets = secrets_of(message)
    as_written = st.sampled_from(sorted(secrets)) if secrets else pieces
    in_any_case = as_written.flatmap(lambda secret: st.sampled_from([secret, secret.upper(), secret.swapcase()]))
    text = "".join(data.draw(st.lists(pieces | in_any_case, max_size=8)))

    assert redact(text, message) == redacted_by_one_expression(text, secrets)


@given(st.text(alphabet=LETTERS, max_size=40))
def test_addresses_are_found_as_the_pattern_of_an_address_finds_them(text):
    assert addresses_like(text) == re.findall(r"[^\s<>(),;:\"']+@[^\s<>(),;:\"']+", text)


def test_letter_case_is_folded_as_regular_expressions_compare_it():
    """Two characters are one after ``fold_case`` exactly when ``re.IGNORECASE`` matches one with the other."""
    every = "".join(map(chr, range(0x110000)))
    folded = fold_case(every)
    changed = {char for char, fold in zip(every, folded, strict=True) if char != fold or char.upper() != char}
    cased = sorted(changed | {folded[ord(char)] for char in changed})
    alike: dict[str, list[str]] = {}
    for char in cased:
        alike.setdefault(folded[ord(char)], []).append(char)
    sample = "".join(cased)
    for char in cased:
        assert re.findall(re.escape(char), sample, re.IGNORECASE) == alike[folded[ord(char)]], hex(ord(char))
