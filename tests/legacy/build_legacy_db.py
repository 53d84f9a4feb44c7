"""Make a database the way a site running django-mailer 2.3.2 would.

Usage: ``python -I build_legacy_db.py LOCK_PATH``, with the python of the
legacy virtualenv (see ``tests/legacy/venv.py``), from a directory where
this project's ``mailer`` package is not importable. The database is named
by ``MAILER_LEGACY_DATABASE``, a JSON object in the form of an entry of
Django's ``DATABASES``: a SQLite file, or an empty database on a PostgreSQL
or MariaDB server (the venv then holds that vendor's driver).

It migrates the database with django-mailer 2.3.2's own migrations, then
fills it only through django-mailer 2.3.2's own API, as a site does:

- messages queued with ``mailer.send_mail``, ``mailer.send_html_mail``,
  ``make_message`` (with attachments, assigned through ``.email``) and the
  ``DbBackend`` behind ``django.core.mail.send_mail``;
- one message of each priority, a high-priority one queued last (so that
  only the priority puts it first), and one deferred by ``Message.defer()``
  with the failure row the 2.3.2 engine logs for it;
- a don't-send entry, which 2.3.2 applies while queueing;
- a message really sent by the 2.3.2 engine (to Django's locmem backend), so
  the database holds a genuine success log row.

It prints a JSON manifest of what it queued on stdout. The manifest records
the inputs, not what was read back, so the test compares the delivered mail
with what the site meant to send.
"""

import base64
import json
import os
import sys


def configure(database: dict, lock_path: str) -> None:
    from django.conf import settings

    settings.configure(
        SECRET_KEY="legacy-site",
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "mailer"],
        DATABASES={"default": database},
        # How a django-mailer 2.x site is set up: Django's mail API queues,
        # MAILER_EMAIL_BACKEND delivers (here to memory; only the one message
        # sent below goes through it).
        EMAIL_BACKEND="mailer.backend.DbBackend",
        MAILER_EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        MAILER_LOCK_PATH=lock_path,
    )
    import django

    django.setup()


def check_legacy_package() -> dict:
    """Refuse to run against anything but the real django-mailer 2.3.2 from the venv."""
    import django

    import mailer

    location = os.path.dirname(os.path.abspath(mailer.__file__))
    if mailer.__version__ != "2.3.2" or "site-packages" not in location:
        raise SystemExit(f"expected django-mailer 2.3.2 from site-packages, got {mailer.__version__} at {location}")
    from django.db import connection

    return {
        "mailer_version": mailer.__version__,
        "mailer_location": location,
        "django_version": django.get_version(),
        "database_vendor": connection.vendor,
    }


def attachment_entry(filename: str, content, mimetype: str) -> dict:
    raw = content.encode("utf-8") if isinstance(content, str) else content
    return {"filename": filename, "mimetype": mimetype, "content_b64": base64.b64encode(raw).decode("ascii")}


def queue_everything() -> dict:
    from django.core import mail as django_mail
    from django.core.mail import EmailMessage
    from django.utils import timezone

    import mailer
    from mailer import engine
    from mailer.models import (
        PRIORITY_DEFERRED,
        PRIORITY_HIGH,
        PRIORITY_LOW,
        PRIORITY_MEDIUM,
        RESULT_FAILURE,
        DontSendEntry,
        Message,
        MessageLog,
        make_message,
    )

    queued = []

    # A message the legacy engine really sends, leaving a success log row.
    mailer.send_mail("Sent before the upgrade ✓", "Old news.", "site@example.com", ["old@example.com"])
    engine.send_all()
    if Message.objects.exists() or MessageLog.objects.count() != 1:
        raise SystemExit("the legacy engine did not send the first message")
    sent_before = MessageLog.objects.get()

    # The don't-send list, added before the message that it filters.
    DontSendEntry.objects.create(to_address="blocked@example.com", when_added=timezone.now())

    # Queued in this order; each entry says how the test expects it to arrive.
    mailer.send_mail(
        "Grüße ✓ plain",
        "Hallo Welt — Grüße ✓\nA second line.\n",
        "Jürgen Sender <sender@example.com>",
        ["plain@example.com"],
    )
    queued.append(
        {
            "key": "plain",
            "subject": "Grüße ✓ plain",
            "body": "Hallo Welt — Grüße ✓\nA second line.\n",
            "from_email": "Jürgen Sender <sender@example.com>",
            "envelope_from": "sender@example.com",
            "to": ["plain@example.com"],
            "rcpt": ["plain@example.com"],
            "priority": PRIORITY_MEDIUM,
        }
    )

    mailer.send_html_mail(
        "HTML ✓ message",
        "The text version ✓",
        "<p>The <b>HTML</b> version ✓</p>",
        "site@example.com",
        ["html@example.com"],
        headers={"X-Legacy-Header": "kept ✓"},
    )
    queued.append(
        {
            "key": "html",
            "subject": "HTML ✓ message",
            "body": "The text version ✓",
            "html": "<p>The <b>HTML</b> version ✓</p>",
            "headers": {"X-Legacy-Header": "kept ✓"},
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["html@example.com"],
            "rcpt": ["html@example.com"],
            "priority": PRIORITY_MEDIUM,
        }
    )

    # make_message, then any EmailMessage assigned to .email: how 2.x
    # documents queueing attachments.
    csv_text = "a,b\n1,2\n"
    binary = bytes([0x00, 0x01, 0x7F, 0x80, 0xC3, 0x28, 0xFE, 0xFF]) + "ü".encode("latin-1")
    email = EmailMessage(
        "Attachments ✓",
        "See the attached files.",
        "site@example.com",
        to=["files@example.com"],
        cc=["copy@example.com"],
        bcc=["hidden@example.com"],
    )
    email.attach("report.csv", csv_text, "text/csv")
    email.attach("blob.bin", binary, "application/octet-stream")
    message = make_message(priority=PRIORITY_MEDIUM)
    message.email = email
    message.save()
    queued.append(
        {
            "key": "attachments",
            "subject": "Attachments ✓",
            "body": "See the attached files.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["files@example.com"],
            "cc": ["copy@example.com"],
            "rcpt": ["files@example.com", "copy@example.com", "hidden@example.com"],
            "attachments": [
                attachment_entry("report.csv", csv_text, "text/csv"),
                attachment_entry("blob.bin", binary, "application/octet-stream"),
            ],
            "priority": PRIORITY_MEDIUM,
        }
    )

    # 2.3.2 drops addresses on the don't-send list (case-insensitively) when queueing.
    mailer.send_mail(
        "Partly blocked", "Only ok@ gets this.", "site@example.com", ["ok@example.com", "Blocked@Example.com"]
    )
    queued.append(
        {
            "key": "filtered",
            "subject": "Partly blocked",
            "body": "Only ok@ gets this.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["ok@example.com"],
            "rcpt": ["ok@example.com"],
            "priority": PRIORITY_MEDIUM,
        }
    )

    # Django's own API with EMAIL_BACKEND = "mailer.backend.DbBackend".
    django_mail.send_mail("Through Django ✓", "Queued by DbBackend.", "site@example.com", ["django@example.com"])
    queued.append(
        {
            "key": "django",
            "subject": "Through Django ✓",
            "body": "Queued by DbBackend.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["django@example.com"],
            "rcpt": ["django@example.com"],
            "priority": PRIORITY_MEDIUM,
        }
    )

    mailer.send_mail("Low priority", "Whenever.", "site@example.com", ["low@example.com"], priority=PRIORITY_LOW)
    queued.append(
        {
            "key": "low",
            "subject": "Low priority",
            "body": "Whenever.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["low@example.com"],
            "rcpt": ["low@example.com"],
            "priority": PRIORITY_LOW,
        }
    )

    # Deferred as the 2.3.2 engine defers after a delivery error.
    mailer.send_mail("Deferred ✓", "Sent on the retry.", "site@example.com", ["deferred@example.com"])
    deferred = Message.objects.latest("id")
    deferred.defer()
    MessageLog.objects.log(deferred, RESULT_FAILURE, log_message="421 4.3.0 try again later")
    queued.append(
        {
            "key": "deferred",
            "subject": "Deferred ✓",
            "body": "Sent on the retry.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["deferred@example.com"],
            "rcpt": ["deferred@example.com"],
            "priority": PRIORITY_DEFERRED,
        }
    )

    # Queued last: only its priority can make it go first.
    mailer.send_mail("Urgent ✓", "Read me first.", "site@example.com", ["urgent@example.com"], priority=PRIORITY_HIGH)
    queued.append(
        {
            "key": "high",
            "subject": "Urgent ✓",
            "body": "Read me first.",
            "from_email": "site@example.com",
            "envelope_from": "site@example.com",
            "to": ["urgent@example.com"],
            "rcpt": ["urgent@example.com"],
            "priority": PRIORITY_HIGH,
        }
    )

    if Message.objects.count() != len(queued):
        raise SystemExit(f"queued {Message.objects.count()} rows, expected {len(queued)}")
    return {
        "messages": queued,
        "sent_before": {
            "subject": "Sent before the upgrade ✓",
            "message_id": sent_before.message_id,
            "log_id": sent_before.id,
        },
        "dont_send": ["blocked@example.com"],
    }


def main() -> None:
    (lock_path,) = sys.argv[1:]
    configure(json.loads(os.environ["MAILER_LEGACY_DATABASE"]), lock_path)
    from django.core.management import call_command

    manifest = check_legacy_package()
    call_command("migrate", verbosity=0, interactive=False)
    manifest.update(queue_everything())
    json.dump(manifest, sys.stdout, ensure_ascii=True, indent=1)


if __name__ == "__main__":
    main()
