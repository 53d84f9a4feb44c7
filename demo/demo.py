"""mailer in one run: queue mail the way a site does, then deliver it the way cron does.

``./run-demo`` prepares a virtualenv and runs this file. It

1. makes a temporary directory with a SQLite database and migrates it;
2. queues four messages, through mailer's functions and Django's own API,
   with no mail server running: queueing only writes rows;
3. starts a real SMTP server (aiosmtpd) on 127.0.0.1;
4. runs ``manage.py send_mail`` as a separate process, as a cron job would;
5. shows what the server received, the log, and the queue, now empty.

The demo site is ``demo/settings.py`` and ``demo/manage.py``. The exit status
is 1 if a queued message did not arrive, so the demo doubles as a smoke test.
"""

import email
import email.policy
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent


def heading(text):
    print(f"\n=== {text} ===", flush=True)


class Inbox:
    """The SMTP server's handler: keep every message it accepts, and say so."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.rcpt_tos, message))
        print(f"    [smtp server] accepted {message['Subject']!r} for {', '.join(envelope.rcpt_tos)}", flush=True)
        return "250 Message accepted for delivery"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mime_tree(part, depth=0):
    """One line per MIME part: its content type, and the file name of an attachment."""
    name = part.get_filename()
    yield "  " * depth + part.get_content_type() + (f"  (attachment {name!r})" if name else "")
    for child in part.iter_parts():
        yield from mime_tree(child, depth + 1)


def main(work_dir):
    # demo/settings.py reads these, in this process and in `manage.py send_mail`.
    port = free_port()
    os.environ.update(MAILER_DEMO_DIR=work_dir, MAILER_DEMO_SMTP_PORT=str(port), DJANGO_SETTINGS_MODULE="settings")
    import django

    django.setup()
    from aiosmtpd.controller import Controller
    from django.core.mail import EmailMessage
    from django.core.management import call_command
    from django.utils import timezone

    import mailer
    from mailer.delivery import delivery_route
    from mailer.engine import prioritize
    from mailer.models import PRIORITY_HIGH, RESULT_SUCCESS, DontSendEntry, Message, MessageLog, get_message_id

    heading(f"Set-up: Django {django.get_version()}, mailer {mailer.__version__}, SQLite in {work_dir}")
    call_command("migrate", verbosity=0)
    print("  migrate: done (tables mailer_message, mailer_messagelog, mailer_dontsendentry)")
    print(f"  queued mail will be delivered by {delivery_route().describe()} to 127.0.0.1:{port}")

    heading("A site queues mail (no mail server is running yet)")
    DontSendEntry.objects.create(to_address="unsubscribed@demo.example", when_added=timezone.now())
    print("  don't-send list: unsubscribed@demo.example")
    print("  mailer.send_mail(...)                      plain text, to alice and unsubscribed", flush=True)
    mailer.send_mail(
        "Welcome!", "Hello Alice,\n\nthanks for signing up.", None, ["alice@demo.example", "unsubscribed@demo.example"]
    )
    print("  mailer.send_html_mail(...)                 text + HTML alternative")
    mailer.send_html_mail(
        "Your weekly digest",
        "Three new posts this week.",
        "<h1>Digest</h1><p>Three new posts.</p>",
        None,
        ["bob@demo.example"],
    )
    print("  EmailMessage(...).send()                   Django's API, with an attachment")
    report = EmailMessage("Monthly report", "The report is attached.", None, ["carol@demo.example"])
    report.attach("report.csv", "month,signups\n2025-01,42\n", "text/csv")
    report.send()  # the site's email backend (Django 6.1: default mailer) is DbBackend, so this queues
    print("  mailer.send_mail(..., priority=PRIORITY_HIGH)")
    mailer.send_mail("Password reset", "Your code is 123456.", None, ["dave@demo.example"], priority=PRIORITY_HIGH)

    heading(f"The queue: {Message.objects.count()} messages, in sending order")
    queued = set()  # Message-IDs: mailer gives each message its Message-ID when it is queued
    for message in prioritize():
        queued.add(get_message_id(message.email))
        print(f"  {message.get_priority_display():<7} {message.subject!r:<22} to {', '.join(message.to_addresses)}")
    print("  (unsubscribed@demo.example was dropped: it is on the don't-send list)")

    heading("Delivery: `python manage.py send_mail` in its own process, as cron runs it")
    controller = Controller(Inbox(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sent = subprocess.run([sys.executable, str(DEMO_DIR / "manage.py"), "send_mail"], cwd=work_dir)
    finally:
        controller.stop()
    print(f"  exit status {sent.returncode}")

    received = controller.handler.messages
    heading(f"What the SMTP server received: {len(received)} messages")
    for number, (recipients, message) in enumerate(received):
        if number:
            print()
        known = "the one given at queue time" if message["Message-ID"] in queued else "NOT a queued one!"
        print(f"  Subject:    {message['Subject']}")
        print(f"  From:       {message['From']}")
        print(f"  To:         {message['To']}   (envelope: {', '.join(recipients)})")
        print(f"  Message-ID: {message['Message-ID']}   ({known})")
        print("  MIME:       " + "\n              ".join(mime_tree(message)))
        body = " ".join(message.get_body(("plain",)).get_content().split())
        print(f"  Body:       {body[:60]!r}")

    heading("The log (MessageLog), one row per attempt")
    for log in MessageLog.objects.order_by("pk"):
        print(f"  {log.get_result_display():<10} {log.subject!r:<22} {log.message_id}  {log.log_message}".rstrip())
    left = Message.objects.count()
    print(f"\n  Messages still queued: {left}")

    missing = set(queued) - {message["Message-ID"] for _, message in received}
    failed = MessageLog.objects.exclude(result=RESULT_SUCCESS).count()
    if sent.returncode or missing or left or failed:
        print(f"\nFAILED: {len(missing)} not received, {left} still queued, {failed} failed attempts.")
        return 1
    print(f"\nOK: all {len(queued)} queued messages arrived. Next: README.rst, 'Use it in your project'.")
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="mailer-demo-") as work_dir:
        sys.exit(main(work_dir))
