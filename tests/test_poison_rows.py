"""A row that fails in any step of its handling is set aside; it never stops the pass (issue 8).

django-mailer 2.3.2 had no isolation around the steps before and after the
delivery call. A row it could not read, whose Message-ID it could not
derive, whose don't-send check or log row failed, or that its backend or
error handler choked on, raised out of ``send_all``. The row stayed first in
the queue, so every later pass stopped on it too, and nothing behind it was
ever sent.

Each case below stores one such row first in the queue, the way it gets
into a real queue: a pickle django-mailer 2.x wrote, a JSON row written or
edited without mailer's queue-time checks, a buggy backend or error handler.
Ten good messages wait behind it, and one pass delivers to a real SMTP
server. All ten must arrive in that same pass. The row must be kept (never
lost), deferred, released, and given a failure log row that says why.

Two cases exist only on SQLite, which keeps whatever a writer other than
Django puts in a column: text that is not UTF-8, a date Django cannot read.
"""

import base64
import copy
import datetime
import email.header
import json
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.core.mail import EmailMessage, make_msgid
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.db import connection
from django.utils import timezone

import mailer
from mailer import engine
from mailer.codec import email_to_db
from mailer.models import PRIORITY_DEFERRED, PRIORITY_HIGH, RESULT_FAILURE, RESULT_SUCCESS, Message, MessageLog
from tests.conftest import MAILERS_SUPPORTED
from tests.processes import VENDOR, manage
from tests.smtp import SMTPServer

GOOD = 10
POISON_SUBJECT = "First in the queue"
POISON_RECIPIENT = "poison@example.com"


# --------------------------------------------------------------------------
# How the poison rows are made
# --------------------------------------------------------------------------


def poison_email(cls: type[EmailMessage] = EmailMessage, headers: dict[str, str] | None = None) -> EmailMessage:
    """The email each poison row starts from: nothing wrong with it yet."""
    return cls(POISON_SUBJECT, "Body", "from@example.com", [POISON_RECIPIENT], headers=headers)


def legacy_row(email_message: EmailMessage) -> str:
    """The row django-mailer 2.x stored for ``email_message``: base64 of its pickle, as its ``email_to_db`` wrote it."""
    return base64.encodebytes(pickle.dumps(email_message)).decode("ascii")


def legacy_row_with(
    change: Callable[[EmailMessage], None], cls: type[EmailMessage] = EmailMessage
) -> Callable[[], str]:
    """A django-mailer 2.x row of the email ``change`` made a mistake in."""

    def row() -> str:
        email_message = poison_email(cls)  # as 2.x queued it: no Message-ID yet
        change(email_message)
        return legacy_row(email_message)

    return row


def json_row_with(**fields: Any) -> Callable[[], str]:
    """A row in this version's format, edited outside mailer: ``fields`` replace those of the stored email."""

    def row() -> str:
        document = json.loads(email_to_db(poison_email(headers={"Message-ID": make_msgid(domain="example.com")})))
        document["email"].update(fields)
        return json.dumps(document)

    return row


def unchanged(email_message: EmailMessage) -> None:
    pass


def to_a_set(email_message: EmailMessage) -> None:
    email_message.to = {POISON_RECIPIENT}  # type: ignore[assignment]  # the mistake under test


def header_object(email_message: EmailMessage) -> None:
    email_message.extra_headers["X-Campaign"] = email.header.Header("Spring sale", "utf-8")


def cyclic_to(email_message: EmailMessage) -> None:
    email_message.to.append(email_message.to)  # type: ignore[arg-type]  # the mistake under test


def number_as_header_name(email_message: EmailMessage) -> None:
    email_message.extra_headers[5] = "five"  # the mistake under test: extra_headers is typed loosely


def number_as_recipient(email_message: EmailMessage) -> None:
    email_message.to = [5]  # type: ignore[list-item]  # the mistake under test


class SiteEmail(EmailMessage):
    """A site's own email class, listed in MAILER_LEGACY_PICKLE_CLASSES (readable) but not MAILER_EMAIL_CLASSES."""


# --------------------------------------------------------------------------
# Backends and handlers with a bug that the poison message sets off
# --------------------------------------------------------------------------


class RaisingSMTPBackend(DjangoSMTPBackend):
    """Django's SMTP backend with a bug: it raises ``error`` for the poison message, and delivers the rest."""

    error: Exception = RuntimeError("the backend has a bug")

    def send_messages(self, email_messages):
        if any(message.subject == POISON_SUBJECT for message in email_messages):
            raise copy.copy(self.error)
        return super().send_messages(email_messages)


class KeyErrorSMTPBackend(RaisingSMTPBackend):
    error = KeyError("tracking-id")


def buggy_error_handler(connection, message, exc):
    """A site's MAILER_ERROR_HANDLER with a bug of its own; 2.x's contract even told handlers to raise."""
    raise ValueError(f"the handler has a bug ({type(exc).__name__})")


def refuse_poison_recipient(server: SMTPServer) -> None:
    server.reject_recipient(POISON_RECIPIENT, "550 5.1.1 No such user")


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    row: Callable[[], str]
    #: What the failure log row of the poison message says (a regular expression).
    problem: str
    #: The backend that delivers (a class of this module) instead of Django's SMTP backend.
    backend: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: What the SMTP server is told before the pass.
    server: Callable[[SMTPServer], None] | None = None
    #: An SQL assignment applied to the stored row, as a tool writing SQLite directly could leave it.
    sqlite_columns: str | None = None


# SQLite keeps whatever a writer other than Django puts in a column: bytes
# that are not UTF-8, dates in a form Django does not read.
SQLITE_ONLY = pytest.mark.skipif(VENDOR != "sqlite", reason="only SQLite stores such values")


# How the reader and the codec begin their reasons.
REFUSED = "^legacy pickle refused: "
DAMAGED = "^message data is damaged: "

POISONS = {
    # Legacy rows: pickles of real objects, stored as django-mailer 2.x stored them.
    "legacy to is a set": Poison(legacy_row_with(to_a_set), REFUSED + r"to is not a list$"),
    "legacy cyclic list": Poison(legacy_row_with(cyclic_to), REFUSED + r"it contains itself$"),
    "legacy header name is a number": Poison(
        legacy_row_with(number_as_header_name), REFUSED + r"a header name is a int, not text$"
    ),
    "legacy recipient is a number": Poison(legacy_row_with(number_as_recipient), REFUSED + r"to is a int, not text$"),
    # Readable, but giving it its Message-ID means storing it again, which its class does not allow.
    "legacy Message-ID cannot be stored": Poison(
        legacy_row_with(unchanged, SiteEmail),
        DAMAGED + rf"UnstorableEmail: email is a {__name__}.SiteEmail: add it to MAILER_EMAIL_CLASSES",
        settings={"MAILER_LEGACY_PICKLE_CLASSES": [f"{__name__}.SiteEmail"]},
    ),
    # JSON rows written outside mailer's checks. 2.x took the Message-ID from a list of headers and failed.
    "json extra_headers is a list": Poison(
        json_row_with(extra_headers=[["Message-ID", "<a@example.com>"]]), DAMAGED + r"extra_headers is not a dict$"
    ),
    'json extra_headers is ""': Poison(json_row_with(extra_headers=""), DAMAGED + r"extra_headers is not a dict$"),
    "json recipient is the number 5": Poison(json_row_with(to=[5]), DAMAGED + r"to holds something not text$"),
    # No driver can encode it, so it cannot be on the don't-send list; the SMTP backend refuses it
    # (Django 5.2 on Python 3.10 when it encodes the address, later ones when they check it).
    "json recipient with a lone surrogate": Poison(
        json_row_with(to=["lone\ud800@example.com"]),
        r"^(ValueError: Invalid address .*non-ASCII|UnicodeEncodeError: .*surrogates not allowed)",
    ),
    # Addresses Django takes into an EmailMessage but its SMTP backend refuses to send.
    "json non-ASCII local part": Poison(
        json_row_with(to=["jöhn@example.com"]), r"^ValueError: Invalid address .*non-ASCII"
    ),
    "json two addresses in one entry": Poison(
        json_row_with(to=["a@example.com, b@example.com"]),
        r"^ValueError: Invalid address.*(single address|could be parsed)",
    ),
    "json not an address": Poison(json_row_with(to=["not an address"]), r"^ValueError: Invalid address"),
    "json non-ASCII sender": Poison(
        json_row_with(from_email="jöhn@example.com"), r"^ValueError: Invalid address .*non-ASCII"
    ),
    # A good row that the delivering backend, or the error handler, chokes on.
    "backend raises RuntimeError": Poison(
        json_row_with(), r"^RuntimeError: the backend has a bug$", backend="RaisingSMTPBackend"
    ),
    "backend raises KeyError": Poison(json_row_with(), r"^KeyError: 'tracking-id'$", backend="KeyErrorSMTPBackend"),
    "error handler raises": Poison(
        json_row_with(),
        r"550.*\(MAILER_ERROR_HANDLER raised ValueError: the handler has a bug \(SMTPRecipientsRefused\)\)$",
        settings={"MAILER_ERROR_HANDLER": f"{__name__}.buggy_error_handler"},
        server=refuse_poison_recipient,
    ),
    # Its failure log row cannot be written: Django reads the date as None, the log's column is NOT NULL.
    "log row cannot be written (when_added unreadable)": Poison(
        json_row_with(to=[5]), DAMAGED + r"to holds something not text$", sqlite_columns="when_added = 'yesterday'"
    ),
    # The row itself cannot be read: SQLite returns text that is not UTF-8 as an error.
    "row cannot be read (not UTF-8)": Poison(
        json_row_with(), r"UTF-8", sqlite_columns="message_data = CAST(X'80FF41' AS TEXT)"
    ),
}

ON_SQLITE_ONLY = {"log row cannot be written (when_added unreadable)", "row cannot be read (not UTF-8)"}

# Django 5.2's SMTP backend sends these as they are (a non-ASCII local part
# as an encoded word), and the test server takes them: no poison there.
DJANGO_6_REFUSES = pytest.mark.skipif(
    not hasattr(DjangoSMTPBackend, "prep_address"), reason="Django 5.2's SMTP backend sends this address"
)
ON_DJANGO_6_ONLY = {"json non-ASCII local part", "json not an address", "json non-ASCII sender"}


def marks(name: str) -> list[Any]:
    return [SQLITE_ONLY] * (name in ON_SQLITE_ONLY) + [DJANGO_6_REFUSES] * (name in ON_DJANGO_6_ONLY)


CASES = [pytest.param(case, id=name, marks=marks(name)) for name, case in POISONS.items()]


def use_backend(settings, backend: str) -> None:
    """Deliver through ``backend`` (a class of this module) to the same SMTP server."""
    path = f"{__name__}.{backend}"
    if MAILERS_SUPPORTED:
        mailers = copy.deepcopy(settings.MAILERS)
        mailers["smtp"]["BACKEND"] = path
        settings.MAILERS = mailers
    else:
        settings.MAILER_EMAIL_BACKEND = path


def store_first(row: str, sqlite_columns: str | None = None) -> Message:
    """Store ``row`` as the first message of the queue: highest priority, queued long before any other."""
    message = Message.objects.create(
        message_data=row, priority=PRIORITY_HIGH, when_added=timezone.now() - datetime.timedelta(days=1)
    )
    if sqlite_columns is not None:
        with connection.cursor() as cursor:
            cursor.execute(f"UPDATE mailer_message SET {sqlite_columns} WHERE id = %s", [message.pk])  # noqa: S608
    return message


def queue_good() -> None:
    for n in range(GOOD):
        assert mailer.send_mail(f"Good {n}", "Body", "from@example.com", [f"good{n}@example.com"]) == 1


def good_subjects() -> list[str]:
    return sorted(f"Good {n}" for n in range(GOOD))


def received_subjects(server: SMTPServer) -> list[str]:
    return sorted(str(received.message["Subject"]) for received in server.received)


# In autocommit, as the send_mail command runs: a database error is then the row's alone.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("log_data", [True, False], ids=["log data", "no log data"])
@pytest.mark.parametrize("case", CASES)
def test_a_poison_row_first_in_the_queue_stops_nothing_behind_it(case, log_data, settings, deliver_to_smtp):
    """With message data kept out of the log too: the redacted log row is written from the same bad row."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = log_data
    if case.backend is not None:
        use_backend(settings, case.backend)
    for name, value in case.settings.items():
        setattr(settings, name, value)
    if case.server is not None:
        case.server(deliver_to_smtp)
    row = case.row()
    poison = store_first(row, case.sqlite_columns)
    queue_good()

    counts = engine.send_all()

    # Every good message went out, in this very pass.
    assert received_subjects(deliver_to_smtp) == good_subjects()
    assert counts is not None
    assert (counts["sent"], counts["deferred"], counts["failed"]) == (GOOD, 1, 0)
    # The poison row is kept as it was, set aside for a human, and free.
    kept = Message.objects.defer("message_data").get()  # it may be unreadable by design
    assert kept.pk == poison.pk
    if case.sqlite_columns is None:
        assert kept.message_data == row
    assert kept.priority == PRIORITY_DEFERRED
    assert kept.claimed_until is None
    assert not kept.failed_permanently
    # It was handled first, and its failure log row says why.
    logs = list(MessageLog.objects.order_by("pk"))
    assert [log.result for log in logs] == [RESULT_FAILURE] + [RESULT_SUCCESS] * GOOD
    assert re.search(case.problem, logs[0].log_message), logs[0].log_message
    if "MAILER_ERROR_HANDLER" not in case.settings:
        # Handled where it failed, not caught as the error handler's own failure.
        assert "MAILER_ERROR_HANDLER raised" not in logs[0].log_message

    # Put back by retry_deferred, it is set aside again by the next pass, which delivers the rest.
    assert Message.objects.retry_deferred() == 1
    deliver_to_smtp.received.clear()
    queue_good()
    counts = engine.send_all()
    assert counts is not None and (counts["sent"], counts["deferred"]) == (GOOD, 1)
    assert received_subjects(deliver_to_smtp) == good_subjects()
    assert Message.objects.defer("message_data").get().priority == PRIORITY_DEFERRED


@SQLITE_ONLY
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("column", ["recipients", "subject"])
def test_a_row_that_cannot_be_read_leaks_none_of_its_text_when_the_site_keeps_message_data_out(
    column, settings, deliver_to_smtp, caplog
):
    """SQLite's error quotes the text it could not decode: with message data kept out of the log, so is it."""
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    store_first(json_row_with()(), f"{column} = CAST(X'626F6240736563726574FF' AS TEXT)")  # 'bob@secret' + bad byte

    with caplog.at_level("WARNING", logger="mailer"):
        assert engine.send_all() == {"deferred": 1}

    [log] = MessageLog.objects.all()
    assert log.log_message.startswith("the row cannot be read from the database: OperationalError:")
    assert f"column '{column}'" in log.log_message  # which column, for whoever repairs it
    assert "secret" not in log.log_message
    assert "secret" not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_legacy_header_object_is_read_as_its_text_and_delivered_first(deliver_to_smtp):
    """2.x stopped on a pickled ``email.header.Header`` header value; mailer reads it as its text and sends it."""
    store_first(legacy_row_with(header_object)())
    queue_good()

    counts = engine.send_all()

    assert counts is not None and (counts["sent"], counts["deferred"]) == (GOOD + 1, 0)
    first, *rest = deliver_to_smtp.received
    assert (first.message["Subject"], first.message["X-Campaign"]) == (POISON_SUBJECT, "Spring sale")
    assert first.rcpt_tos == [POISON_RECIPIENT]
    assert sorted(str(received.message["Subject"]) for received in rest) == good_subjects()
    assert Message.objects.count() == 0


@SQLITE_ONLY
@pytest.mark.django_db(transaction=True)
def test_a_sent_message_whose_log_row_cannot_be_written_is_not_sent_again_and_again(settings, deliver_to_smtp):
    """The claim guards against a passing database error; for one that never passes, it only spaces the copies out."""
    settings.MAILER_CLAIM_TIMEOUT = 1
    store_first(json_row_with()(), "when_added = 'yesterday'")
    queue_good()

    first = engine.send_all()
    time.sleep(1.5)  # the claim lapses
    engine.send_all()

    assert first is not None and first["sent"] == GOOD + 1
    assert received_subjects(deliver_to_smtp).count(POISON_SUBJECT) == 1


# --------------------------------------------------------------------------
# The same, with the real send_mail command
# --------------------------------------------------------------------------

PROCESS_CASES = ["legacy to is a set", "json recipient with a lone surrogate", "json two addresses in one entry"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PROCESS_CASES)
def test_manage_py_send_mail_delivers_past_a_poison_row(name, process_db, smtp_server, tmp_path):
    """The row is written with plain SQL, as django-mailer 2.x or an operator would; cron's command runs once."""
    case = POISONS[name]
    row = case.row()
    process_db.execute(
        "INSERT INTO mailer_message (message_data, when_added, priority, retry_count, subject, from_email, recipients)"
        " VALUES (%s, %s, %s, 0, '', '', '')",
        row,
        "2000-01-01 00:00:00",
        PRIORITY_HIGH,
    )
    queued = manage(
        "shell",
        "-c",
        f"import mailer; [mailer.send_mail(f'Good {{n}}', 'Body', 'from@example.com', [f'good{{n}}@example.com'])"
        f" for n in range({GOOD})]",
        db=process_db,
    )
    assert queued.returncode == 0, queued.stderr

    result = manage(
        "send_mail", db=process_db, smtp_port=smtp_server.port, MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock")
    )

    assert result.returncode == 0, result.stderr
    assert f"{GOOD} sent; 1 deferred" in result.stderr
    assert received_subjects(smtp_server) == good_subjects()
    assert process_db.query("SELECT message_data, priority, claimed_until FROM mailer_message") == [
        (row, PRIORITY_DEFERRED, None)
    ]
    logs = process_db.query("SELECT result, log_message FROM mailer_messagelog ORDER BY id")
    assert [result for result, _ in logs] == [RESULT_FAILURE] + [RESULT_SUCCESS] * GOOD
    assert re.search(case.problem, logs[0][1]), logs[0][1]
    assert "MAILER_ERROR_HANDLER raised" not in logs[0][1]
