"""Migration 0010 over a queue holding every kind of bad row that django-mailer's tables may hold.

``migrate`` must finish whatever the rows hold: good pickled rows become
JSON with their search columns filled; bad rows (unreadable, refused,
shaped wrongly, built to cost time) are left exactly as they were, and the
output says how many. Afterwards the engine delivers the good ones and defers
the bad ones, each with its reason; reading a bad row never raises anything
but ``UndecodableData``; and the admin shows each of them.
"""

import base64
import json
import pickle
import re
import time

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from mailer import engine
from mailer.codec import db_to_email, decode
from mailer.exceptions import UndecodableData
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)
from tests import crafted_pickles as crafted
from tests.crafted_pickles import Appends, Call, Memo, Ref, as_row, assemble, email_with
from tests.test_migrations import (  # noqa: F401 -- before_conversion is a fixture
    before_conversion,
    latest_mailer_migration,
    migrate_mailer,
    models_before_conversion,
)

MIGRATION = "0010_convert_pickled_message_data"


def base64_pickle(value, protocol: int = 4) -> str:
    return base64.encodebytes(pickle.dumps(value, protocol=protocol)).decode("ascii")


def genuine_rows() -> dict[str, tuple[str, str, str]]:
    """name: (row, subject, recipients), as django-mailer 2.x (base64) and before 2.0 (raw protocol 0) stored them."""
    multi = EmailMultiAlternatives(
        "Good multi ✓", "Body", "multi@example.com", ["m1@example.com"], cc=["m2@example.com"]
    )
    multi.attach_alternative("<p>Body</p>", "text/html")
    multi.attach("data.bin", b"\x00\xff", "application/octet-stream")
    plain = EmailMessage("Good plain", "Body", "plain@example.com", ["p@example.com"])
    old = EmailMessage("Good old", "Body", "old@example.com", ["o@example.com"], bcc=["ob@example.com"])
    return {
        "multi-protocol4": (base64_pickle(multi), "Good multi ✓", "m1@example.com, m2@example.com"),
        "plain-protocol2": (base64_pickle(plain, 2), "Good plain", "p@example.com"),
        "old-raw-protocol0": (
            pickle.dumps(old, protocol=0).decode("latin-1"),
            "Good old",
            "o@example.com, ob@example.com",
        ),
    }


def email_set(**attributes) -> EmailMessage:
    """A genuine email with ``attributes`` set afterwards, as code could do before django-mailer pickled it."""
    email = EmailMessage("Bad", "Body", "bad@example.com", ["victim@example.com"])
    for name, value in attributes.items():
        setattr(email, name, value)
    return email


def bad_rows(marker: str) -> dict[str, tuple[str, str]]:
    """name: (row, what the refusal says)."""
    return {
        "cyclic-list": (as_row(crafted.cyclic_list(), crafted.BASE64), r"it contains itself"),
        "email-whose-to-holds-itself": (
            as_row(assemble(email_with(2, to=Appends(Memo("to", []), (Ref("to"),))), 2), crafted.BASE64),
            r"it contains itself|to is a list, not text",
        ),
        "attachment-tuple-of-two": (
            base64_pickle(email_set(attachments=[("a.txt", "content")])),
            r"an attachment is neither \(name, content, type\) nor MIME",
        ),
        "cc-None": (base64_pickle(email_set(cc=None)), r"cc is not a list"),
        "extra_headers-a-list": (
            base64_pickle(email_set(extra_headers=[("X-A", "1")])),
            r"extra_headers is not a dict",
        ),
        "trap-REDUCE-sentinel": (
            as_row(assemble(Call(crafted.SENTINEL, (marker,)), 2), crafted.BASE64),
            r"it asks for tests\.crafted_pickles\.sentinel",
        ),
        "trap-raw-protocol0": (
            as_row(assemble(email_with(0, subject=Call(crafted.SENTINEL, (marker,))), 0), crafted.RAW),
            r"it asks for tests\.crafted_pickles\.sentinel",
        ),
        "garbage": ("this is no pickle and no JSON", r"neither JSON nor a django-mailer pickle"),
    }


def insert(model, data: str, **fields):
    """Insert a row as django-mailer left it, with a model of ``models_before_conversion()``: no search column set."""
    if model._meta.model_name == "messagelog":
        fields = {"when_added": timezone.now(), "priority": PRIORITY_MEDIUM, "result": RESULT_SUCCESS, **fields}
    (row,) = model.objects.bulk_create([model(message_data=data, **fields)])
    return model.objects.get(pk=row.pk)


@pytest.mark.usefixtures("before_conversion")
def test_migration_0010_converts_the_good_rows_leaves_every_bad_row_and_the_engine_sorts_them_out(
    tmp_path, capsys, deliver_to_smtp, admin_client
):
    marker = str(tmp_path / f"migration{crafted.MARKER_SUFFIX}")
    good = genuine_rows()
    bad = bad_rows(marker)
    old = models_before_conversion()
    good_messages = {name: insert(old.Message, row) for name, (row, _s, _r) in good.items()}
    good_logs = {name: insert(old.MessageLog, row) for name, (row, _s, _r) in good.items()}
    bad_messages = {name: insert(old.Message, row, priority=PRIORITY_HIGH) for name, (row, _match) in bad.items()}
    bad_logs = {name: insert(old.MessageLog, row, result=RESULT_FAILURE) for name, (row, _match) in bad.items()}
    empty = insert(old.Message, "", priority=PRIORITY_HIGH)

    start = time.perf_counter()
    migrate_mailer(MIGRATION)
    seconds = time.perf_counter() - start

    assert seconds < 5, f"migrate took {seconds:.1f} s"
    output = capsys.readouterr().out
    assert f"{2 * len(good)} pickled row(s) converted to JSON; {2 * len(bad)} left as they were" in output
    # Good rows: JSON, the columns filled from the email.
    for name, (_row, subject, recipients) in good.items():
        for row in (good_messages[name], good_logs[name]):
            row.refresh_from_db()
            assert json.loads(row.message_data)["mailer"] == 1, name
            assert (row.subject, row.recipients) == (subject, recipients), name
    # Bad rows: exactly as they were, columns still empty; and never run.
    for name, (data, _match) in bad.items():
        for row, empty_column in ((bad_messages[name], ""), (bad_logs[name], None)):
            row.refresh_from_db()
            assert row.message_data == data, name
            assert (row.subject, row.from_email, row.recipients) == (empty_column,) * 3, name
    empty.refresh_from_db()
    assert empty.message_data == ""
    assert crafted.CALLS == []
    assert not (tmp_path / f"migration{crafted.MARKER_SUFFIX}").exists()

    # The admin and the engine use today's models: the later migrations (new columns only) first.
    migrate_mailer(latest_mailer_migration())

    # Reading a bad row: None from db_to_email, UndecodableData (saying why) from decode, a page in the admin.
    for name, (data, match) in bad.items():
        assert db_to_email(data) is None, name
        with pytest.raises(UndecodableData, match=match):
            decode(data)
        for model, row in (("message", bad_messages[name]), ("messagelog", bad_logs[name])):
            page = admin_client.get(reverse(f"admin:mailer_{model}_change", args=[row.pk]))
            assert page.status_code == 200, (name, model)
            assert "Can&#x27;t decode" in page.content.decode() or "Can't decode" in page.content.decode(), name
    assert decode("") is None and db_to_email("") is None

    # A pass: the good ones are delivered, the bad ones deferred with their reason, the empty one
    # discarded (nothing in it to keep), as django-mailer did.
    counts = engine.send_all()

    assert counts == {"sent": len(good), "deferred": len(bad)}
    assert sorted(r.message["Subject"] for r in deliver_to_smtp.received) == sorted(s for _r, s, _t in good.values())
    failures = {log.message_data: log.log_message for log in MessageLog.objects.filter(result=RESULT_FAILURE)}
    for name, (data, match) in bad.items():
        row = bad_messages[name]
        row.refresh_from_db()
        assert (row.priority, row.message_data) == (PRIORITY_DEFERRED, data), name
        assert re.search(match, failures[data]), (name, failures[data])
    assert not Message.objects.filter(pk=empty.pk).exists()
    assert "" not in failures
    assert crafted.CALLS == []


@pytest.mark.slow
@pytest.mark.usefixtures("before_conversion")
def test_migration_0010_leaves_a_billion_laughs_row_as_it_was_quickly():
    data = crafted.billion_laughs(18).decode("latin-1")
    row = insert(models_before_conversion().Message, data)

    start = time.perf_counter()
    migrate_mailer(MIGRATION)
    seconds = time.perf_counter() - start

    row.refresh_from_db()
    assert row.message_data == data
    assert seconds < 1


@pytest.mark.usefixtures("before_conversion")
def test_a_nul_in_a_subject_does_not_stop_the_conversion():
    """PostgreSQL refuses a NUL in a text column: the JSON escapes it, and the search column drops it."""
    nul = EmailMessage("NUL \x00 inside", "Body", "f@example.com", ["t@example.com"])
    with connection.cursor() as cursor:  # as django-mailer wrote it: no search columns to derive
        cursor.execute(
            "INSERT INTO mailer_message (message_data, when_added, priority, retry_count, subject, from_email,"
            " recipients) VALUES (%s, %s, %s, 0, '', '', '')",
            [base64_pickle(nul), timezone.now(), PRIORITY_MEDIUM],
        )

    migrate_mailer(MIGRATION)

    message = models_before_conversion().Message.objects.get()
    assert json.loads(message.message_data)["mailer"] == 1
    assert message.subject == "NUL  inside"
    assert decode(message.message_data).subject == "NUL \x00 inside"
