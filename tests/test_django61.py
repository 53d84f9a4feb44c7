"""Both ways of configuring email, on every supported Django, with warnings as errors.

A site keeps the classic settings (``EMAIL_BACKEND = "mailer.backend.DbBackend"``,
``MAILER_EMAIL_BACKEND``, ``EMAIL_HOST``...) or, on Django 6.1, moves to
``MAILERS``. Either way mail must be queued and delivered by Django's real
SMTP backend without mailer's code raising a single warning: a site that
runs with warnings as errors would otherwise be unable to send. Django's
warnings about the classic *settings* are the site's own choice and are
left out; anything mailer's code itself triggers is an error.
"""

import textwrap
import warnings

import django
import pytest
from django.core import mail

from mailer import engine
from mailer.models import Message, MessageLog
from mailer.priority import PRIORITY_LOW
from tests.processes import manage
from tests.settings import DEPRECATED_SETTING_WARNING, NOT_MAILER

pytestmark = pytest.mark.django_db

DB = "mailer.backend.DbBackend"
SMTP = "django.core.mail.backends.smtp.EmailBackend"
CONFIGURATIONS = ["classic"] + (["MAILERS"] if django.VERSION >= (6, 1) else [])


def configure(settings, configuration: str, server) -> None:
    """Configure the site as its settings module would, with Django's own warnings about its settings left out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", DEPRECATED_SETTING_WARNING, module=NOT_MAILER)
        if hasattr(settings, "MAILERS"):
            del settings.MAILERS
        if hasattr(settings, "MAILER_EMAIL_BACKEND"):
            del settings.MAILER_EMAIL_BACKEND
        if configuration == "classic":
            settings.EMAIL_BACKEND = DB
            settings.MAILER_EMAIL_BACKEND = SMTP
            settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = server.host, server.port, 10
        else:
            settings.MAILERS = {
                "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}},
                "bulk": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priority": "low"}},
                "smtp": {"BACKEND": SMTP, "OPTIONS": {"host": server.host, "port": server.port, "timeout": 10}},
            }


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_djangos_send_mail_is_queued_and_delivered_by_djangos_smtp_backend_without_a_warning(
    settings, smtp_server, configuration
):
    configure(settings, configuration, smtp_server)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mail.send_mail("Through Django", "Body", "from@example.com", ["to@example.com"]) == 1
        assert Message.objects.count() == 1
        counts = engine.send_all()

    assert counts == {"sent": 1}
    [received] = smtp_server.received
    assert received.message["Subject"] == "Through Django"
    assert MessageLog.objects.get().result == "1"


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_djangos_email_message_send_goes_through_the_queue_without_a_warning(settings, smtp_server, configuration):
    configure(settings, configuration, smtp_server)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mail.EmailMessage("Sent with send()", "Body", "from@example.com", ["to@example.com"]).send()
        engine.send_all()

    assert [r.message["Subject"] for r in smtp_server.received] == ["Sent with send()"]


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")
def test_a_priority_label_in_options_queues_at_that_priority_without_a_warning(settings, smtp_server):
    configure(settings, "MAILERS", smtp_server)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mail.send_mail("Newsletter", "Body", "from@example.com", ["to@example.com"], using="bulk")

    assert Message.objects.get().priority == PRIORITY_LOW


SITE_SETTINGS = """
from tests.process_settings import *  # the database and SMTP server of the test
from mailer.priority import PRIORITY_HIGH

MAILERS = {{
    "default": {{"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {{"deliver_using": {deliver_using!r}}}}},
    "urgent": {{
        "BACKEND": "mailer.backend.DbBackend",
        "OPTIONS": {{"deliver_using": "smtp", "priority": PRIORITY_HIGH}},
    }},
    "smtp": MAILERS["smtp"],
}}
"""


QUEUE_URGENT = "from django.core import mail; mail.send_mail('Urgent', 'B', None, ['t@example.com'], using='urgent')"


@pytest.mark.slow
@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")
def test_a_settings_module_uses_the_constants_and_check_catches_a_misspelt_alias(process_db, smtp_server, tmp_path):
    """A real site: its settings import mailer.priority; every process runs with warnings as errors."""

    def run(*args, deliver_using="smtp"):
        (tmp_path / "site_settings.py").write_text(textwrap.dedent(SITE_SETTINGS.format(deliver_using=deliver_using)))
        return manage(
            *args,
            db=process_db,
            smtp_port=smtp_server.port,
            DJANGO_SETTINGS_MODULE="site_settings",
            PYTHONPATH=str(tmp_path),
            PYTHONWARNINGS="error",
            # The settings file is rewritten within the second, at the same size: no stale .pyc of it.
            PYTHONDONTWRITEBYTECODE="1",
            MAILER_PROCESS_LOCK_PATH=str(tmp_path / "lock"),
        )

    misspelt = run("check", deliver_using="stmp")
    assert misspelt.returncode != 0
    assert "mailer.E002" in misspelt.stderr and "'stmp'" in misspelt.stderr

    checked = run("check")
    assert checked.returncode == 0, checked.stderr
    queued = run(
        "shell",
        "-c",
        "from django.core import mail; mail.send_mail('Urgent', 'B', None, ['t@example.com'], using='urgent')",
    )
    assert queued.returncode == 0, queued.stderr
    assert process_db.query("SELECT priority FROM mailer_message") == [(1,)]
    sent = run("send_mail")
    assert sent.returncode == 0, sent.stderr
    assert [r.message["Subject"] for r in smtp_server.received] == ["Urgent"]
