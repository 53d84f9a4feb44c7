"""Putting mail on the queue: every way in stores a row and sends nothing."""

import re

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import connection
from django.test.utils import CaptureQueriesContext

import mailer
from mailer.backend import DbBackend
from mailer.models import (
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    DontSendEntry,
    Message,
    make_message,
)

pytestmark = pytest.mark.django_db


def test_send_mail_queues_without_sending():
    assert mailer.send_mail("Subject", "Body", "from@example.com", ["to@example.com"]) == 1

    [message] = Message.objects.all()
    assert message.priority == PRIORITY_MEDIUM
    assert message.subject == "Subject"
    assert message.to_addresses == ["to@example.com"]
    assert message.email.body == "Body"
    assert mail.outbox == []


def test_lazy_strings_are_resolved_when_queued():
    from django.utils.translation import gettext_lazy

    mailer.send_mail(gettext_lazy("Lazy subject"), gettext_lazy("Lazy body"), "f@example.com", ["t@example.com"])

    email = Message.objects.get().email
    assert type(email.subject) is str and email.subject == "Lazy subject"
    assert type(email.body) is str


def test_send_html_mail_queues_an_html_alternative_and_headers():
    mailer.send_html_mail(
        "Subject", "Text", "<p>HTML</p>", "from@example.com", ["to@example.com"],
        priority=PRIORITY_HIGH, headers={"X-Campaign": "welcome"},
    )  # fmt: skip

    message = Message.objects.get()
    assert message.priority == PRIORITY_HIGH
    email = message.email
    assert isinstance(email, EmailMultiAlternatives)
    assert [(a[0], a[1]) for a in email.alternatives] == [("<p>HTML</p>", "text/html")]
    assert email.extra_headers["X-Campaign"] == "welcome"


def test_send_mass_mail_queues_one_message_per_tuple():
    count = mailer.send_mass_mail(
        [
            ("One", "Body", "from@example.com", ["a@example.com"]),
            ("Two", "Body", "from@example.com", ["b@example.com", "c@example.com"]),
        ]
    )
    assert count == 2
    assert sorted(m.subject for m in Message.objects.all()) == ["One", "Two"]


@pytest.mark.parametrize(
    "admins",
    [
        [("Ada", "ada@example.com"), ("Bob", "bob@example.com")],
        ["ada@example.com", "bob@example.com"],
    ],
    ids=["pairs", "addresses"],
)
@pytest.mark.parametrize("function, setting", [(mailer.mail_admins, "ADMINS"), (mailer.mail_managers, "MANAGERS")])
def test_mail_admins_and_managers_accept_both_setting_styles(settings, admins, function, setting):
    setattr(settings, setting, admins)
    settings.EMAIL_SUBJECT_PREFIX = "[site] "
    settings.SERVER_EMAIL = "server@example.com"

    function("Broken", "Traceback", priority=PRIORITY_HIGH)

    message = Message.objects.get()
    assert message.to_addresses == ["ada@example.com", "bob@example.com"]
    assert message.subject == "[site] Broken"
    assert message.email.from_email == "server@example.com"
    assert message.priority == PRIORITY_HIGH


@pytest.mark.parametrize("function, setting", [(mailer.mail_admins, "ADMINS"), (mailer.mail_managers, "MANAGERS")])
def test_mail_admins_and_managers_queue_nothing_without_recipients(settings, function, setting):
    setattr(settings, setting, [])
    assert function("Subject", "Body") == 0
    assert Message.objects.count() == 0


def test_mail_admins_rejects_a_malformed_setting(settings):
    settings.ADMINS = [("Ada", "ada@example.com", "extra")]
    with pytest.raises(ImproperlyConfigured, match="ADMINS"):
        mailer.mail_admins("Subject", "Body")


def test_priorities_are_validated_when_queued():
    with pytest.raises(ValueError, match="Invalid priority 7"):
        mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"], priority=7)
    assert Message.objects.count() == 0


def test_priority_labels_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="PRIORITY_"):
        mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"], priority="low")
    assert Message.objects.get().priority == PRIORITY_LOW


def test_get_priority():
    assert mailer.get_priority(None) == PRIORITY_MEDIUM
    assert mailer.get_priority(PRIORITY_HIGH) == PRIORITY_HIGH
    for bad in ["urgent", 0, True, "1"]:
        with pytest.raises(ValueError, match=re.escape(f"Invalid priority {bad!r}")):
            mailer.get_priority(bad)  # type: ignore[arg-type]  # wrong on purpose


def test_malformed_messages_fail_when_queued_not_when_sent():
    # Django 5.2 and 6.x word the first one differently.
    with pytest.raises(ValueError, match="Header values (can't contain newlines|may not contain linefeed)"):
        mailer.send_mail("Injected\nBcc: victim@example.com", "Body", "f@example.com", ["t@example.com"])
    with pytest.raises(TypeError, match='"to" argument must be a list or tuple'):
        mailer.send_mail("Subject", "Body", "f@example.com", "t@example.com")  # a string, not a list
    assert Message.objects.count() == 0


def test_message_id_is_assigned_when_queued_and_kept():
    mailer.send_mail("Subject", "Body", "f@example.com", ["t@example.com"])
    email = EmailMessage("Own id", "Body", "f@example.com", ["t@example.com"], headers={"message-id": "<own@x>"})
    DbBackend().send_messages([email])

    ids = [m.email.extra_headers for m in Message.objects.order_by("pk")]
    assert ids[0]["Message-ID"].startswith("<") and ids[0]["Message-ID"].endswith(">")
    assert ids[1] == {"message-id": "<own@x>"}


def test_db_backend_queues_in_bulk_and_counts():
    emails = [EmailMessage(f"S{n}", "B", "f@example.com", [f"t{n}@example.com"]) for n in range(5)]
    emails.append(EmailMessage("Nobody", "B", "f@example.com", []))

    assert DbBackend().send_messages(emails) == 5
    assert sorted(Message.objects.values_list("subject_copy", flat=True)) == [f"S{n}" for n in range(5)]


@pytest.mark.parametrize("batch_size, inserts", [(2, 3), (5, 1), (None, 1)], ids=["2", "5", "None"])
def test_messages_batch_size_is_how_many_rows_each_insert_holds(settings, batch_size, inserts):
    """None (the default) leaves it to bulk_create: one INSERT for a few messages, on every database."""
    settings.MAILER_MESSAGES_BATCH_SIZE = batch_size
    emails = [EmailMessage(f"S{n}", "B", "f@example.com", [f"t{n}@example.com"]) for n in range(5)]

    with CaptureQueriesContext(connection) as queries:
        assert DbBackend().send_messages(emails) == 5

    statements = [query["sql"] for query in queries.captured_queries]
    assert len([sql for sql in statements if sql.lstrip().upper().startswith("INSERT")]) == inserts, statements
    assert Message.objects.count() == 5


def test_django_send_mail_goes_to_the_queue_through_db_backend(settings):
    if django.VERSION >= (6, 1):
        settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"priority": PRIORITY_LOW}}}
    else:
        settings.EMAIL_BACKEND = "mailer.backend.DbBackend"

    mail.send_mail("Via Django", "Body", "f@example.com", ["t@example.com"])

    message = Message.objects.get()
    assert message.subject == "Via Django"
    if django.VERSION >= (6, 1):
        assert message.priority == PRIORITY_LOW


def test_make_message_returns_an_unsaved_message():
    message = make_message("Subject", "Body", "f@example.com", ["t@example.com"], bcc=["b@example.com"])
    assert message._state.adding and Message.objects.count() == 0
    assert message.email.bcc == ["b@example.com"]
    message.save()
    assert Message.objects.count() == 1


class TestDontSendList:
    @pytest.fixture(autouse=True)
    def blocked(self):
        from django.utils import timezone

        DontSendEntry.objects.create(to_address="Blocked@Example.com", when_added=timezone.now())

    def test_listed_recipients_are_dropped_on_every_way_in(self):
        recipients = ["ok@example.com", "blocked@example.com", "Name <BLOCKED@example.com>"]
        mailer.send_mail("send_mail", "", "f@example.com", recipients)
        mailer.send_html_mail("send_html_mail", "", "<p></p>", "f@example.com", recipients)
        make_message("make_message", "", "f@example.com", recipients, bcc=["blocked@example.com"]).save()
        DbBackend().send_messages(
            [EmailMessage("DbBackend", "", "f@example.com", recipients, cc=["blocked@example.com"])]
        )

        for message in Message.objects.all():
            assert message.email.recipients() == ["ok@example.com"], message.subject

    def test_one_statement_per_message_whatever_the_number_of_recipients(self, django_assert_num_queries):
        recipients = [f"user{n}@example.com" for n in range(50)]
        with django_assert_num_queries(1):  # the insert, which checks the list itself
            mailer.send_mail("Many", "", "f@example.com", recipients)

    def test_a_message_for_listed_recipients_only_is_still_queued_whole(self):
        mailer.send_mail("Blocked", "", "f@example.com", ["blocked@example.com"])
        assert Message.objects.get().to_addresses == ["blocked@example.com"]

    def test_has_address_ignores_case(self):
        assert DontSendEntry.objects.has_address("BLOCKED@example.COM")
        assert not DontSendEntry.objects.has_address("other@example.com")


def test_reused_emails_and_header_dicts_get_a_message_id_each():
    """Sites reuse one headers dict, or one EmailMessage for several recipients: every copy is its own message."""
    headers = {"X-Campaign": "spring"}
    mailer.send_html_mail("One", "t", "<p>h</p>", "f@example.com", ["a@example.com"], headers=headers)
    mailer.send_html_mail("Two", "t", "<p>h</p>", "f@example.com", ["b@example.com"], headers=headers)
    email = EmailMessage("Reused", "Body", "f@example.com", ["c@example.com"])
    DbBackend().send_messages([email])
    email.to = ["d@example.com"]
    DbBackend().send_messages([email])

    assert headers == {"X-Campaign": "spring"}
    assert "Message-ID" not in email.extra_headers
    ids = [m.message_id for m in Message.objects.all()]
    assert len(set(ids)) == 4 and all(ids)


class BrandedEmail(EmailMessage):
    """A site's own subclass, with plain data of its own."""

    def __init__(self, *args, campaign="", **kwargs):
        super().__init__(*args, **kwargs)
        self.campaign = campaign


def test_a_subclass_must_be_listed_to_be_queued(settings):
    """Stored rows may name only listed classes; an unlisted one fails when queued, not in the cron job."""
    email = BrandedEmail("Branded", "Body", "f@example.com", ["t@example.com"], campaign="winter")
    with pytest.raises(ValueError, match=r"tests\.test_queueing\.BrandedEmail: add it to MAILER_EMAIL_CLASSES"):
        DbBackend().send_messages([email])
    assert Message.objects.count() == 0

    settings.MAILER_EMAIL_CLASSES = ["tests.test_queueing.BrandedEmail"]
    DbBackend().send_messages([email])
    stored = Message.objects.get().email
    assert (type(stored), stored.campaign) == (BrandedEmail, "winter")


def test_a_row_naming_an_unlisted_class_imports_nothing():
    import json
    import sys

    from mailer.codec import UndecodableData, decode, email_to_db

    document = json.loads(email_to_db(EmailMessage("S", "B", "f@example.com", ["t@example.com"])))
    document["email"]["class"] = "django.contrib.gis.gdal.libgdal.EmailMessage"
    sys.modules.pop("django.contrib.gis.gdal.libgdal", None)

    with pytest.raises(UndecodableData, match="is not one that may be queued"):
        decode(json.dumps(document))
    assert "django.contrib.gis.gdal.libgdal" not in sys.modules


def test_the_email_setter_stores_lazy_addresses_as_text():
    """``message.email = ...`` takes what Django takes, lazy translations included, and reads back plain text."""
    from django.utils.translation import gettext_lazy

    message = make_message("Subject", "Body", "f@example.com", ["t@example.com"])
    lazy_to = [gettext_lazy("t@example.com")]
    message.email = EmailMessage("Subject", "Body", "f@example.com", lazy_to)  # type: ignore[arg-type]  # on purpose
    message.save()

    assert type(Message.objects.get().email.to[0]) is str


def test_a_nul_in_the_subject_is_left_out_of_the_search_column_on_every_database():
    """PostgreSQL refuses a NUL in text; the stored message keeps it, its searchable copy does not. Queueing
    refuses such a subject (``test_bad_input``); a message assigned to a row, as django-mailer allowed, keeps it."""
    message = Message(message_data="")
    message.email = EmailMessage("Sub\x00ject", "Body", "f@example.com", ["t@example.com"])
    message.save()

    message = Message.objects.get()
    assert message.subject_copy == "Subject"
    assert message.email.subject == message.subject == "Sub\x00ject"
