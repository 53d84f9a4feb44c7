"""``manage.py check`` reports every setting that would keep queued mail from leaving, before anything runs.

Each problem has its own stable id and a hint; the same settings are still
refused when ``send_mail`` runs (tests/test_delivery_route.py).
"""

from typing import Any

import django
import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from mailer.checks import check_mail_delivery

DB = "mailer.backend.DbBackend"
SMTP = "django.core.mail.backends.smtp.EmailBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"
SMTP_OPTIONS = {"host": "mail.example.com", "port": 587, "use_tls": True}

needs_mailers = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")


def reported(settings, mailers=None, **overrides):
    """Return (id, message, hint) of each problem mailer's check reports with these settings.

    ``mailers`` replaces MAILERS (None: the classic settings, without MAILERS);
    MAILER_EMAIL_BACKEND is unset unless given.
    """
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    if mailers is not None:
        settings.MAILERS = mailers
    if hasattr(settings, "MAILER_EMAIL_BACKEND"):
        del settings.MAILER_EMAIL_BACKEND
    for name, value in overrides.items():
        setattr(settings, name, value)
    return [(problem.id, problem.msg, problem.hint) for problem in check_mail_delivery()]


def ids(problems):
    return [problem_id for problem_id, _msg, _hint in problems]


def test_the_classic_settings_pass(settings):
    assert reported(settings, MAILER_EMAIL_BACKEND=SMTP) == []
    assert reported(settings) == []  # MAILER_EMAIL_BACKEND's default is Django's SMTP backend


def test_mailer_email_backend_naming_the_queue_is_e005(settings):
    [(problem_id, msg, hint)] = reported(settings, MAILER_EMAIL_BACKEND=DB)
    assert problem_id == "mailer.E005"
    assert "EMAIL_BACKEND and MAILER_EMAIL_BACKEND" in msg
    assert SMTP in hint


def test_a_mailer_email_backend_that_cannot_be_imported_is_e007(settings):
    [(problem_id, msg, _hint)] = reported(settings, MAILER_EMAIL_BACKEND="myproject.mail.Backend")
    assert problem_id == "mailer.E007"
    assert "'myproject.mail.Backend'" in msg


@needs_mailers
class TestMailers:
    def test_the_recommended_settings_pass(self, settings):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priority": "high"}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
        }
        assert reported(settings, mailers) == []

    def test_a_queue_default_without_deliver_using_is_e001(self, settings):
        [(problem_id, msg, hint)] = reported(settings, {"default": {"BACKEND": DB}})
        assert problem_id == "mailer.E001"
        assert msg.startswith("MAILERS['default']: ") and "deliver_using" in msg
        assert '"deliver_using": "smtp"' in hint

    def test_no_default_mailer_and_no_mailer_email_backend_is_e001(self, settings):
        assert ids(reported(settings, {"smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS}})) == ["mailer.E001"]

    def test_a_misspelt_deliver_using_is_e002_with_the_aliases_in_the_hint(self, settings):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "stmp"}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
        }
        [(problem_id, msg, hint)] = reported(settings, mailers)
        assert problem_id == "mailer.E002"
        assert "'stmp'" in msg
        assert "'smtp'" in hint

    def test_a_misspelt_deliver_using_of_another_queue_mailer_is_e002_too(self, settings):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}},
            "bulk": {"BACKEND": DB, "OPTIONS": {"deliver_using": "ses"}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
        }
        [(problem_id, msg, _hint)] = reported(settings, mailers)
        assert problem_id == "mailer.E002"
        assert msg.startswith("MAILERS['bulk']: ")

    def test_deliver_using_naming_another_queue_is_e003(self, settings):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "queue"}},
            "queue": {"BACKEND": DB},
        }
        assert "mailer.E003" in ids(reported(settings, mailers))

    @pytest.mark.parametrize("priority", ["urgent", 4, "deferred", True])
    def test_a_bad_priority_is_e004(self, settings, priority):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priority": priority}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
        }
        [(problem_id, msg, _hint)] = reported(settings, mailers)
        assert problem_id == "mailer.E004"
        assert msg.startswith("MAILERS['default']: OPTIONS['priority']") and repr(priority) in msg

    def test_mailer_email_backend_naming_the_queue_is_e005(self, settings):
        mailers = {"default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}}, "smtp": {"BACKEND": SMTP}}
        assert "mailer.E005" in ids(reported(settings, mailers, MAILER_EMAIL_BACKEND=DB))

    def test_an_unknown_option_is_e006_and_named(self, settings):
        mailers = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp", "priorty": "high"}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
        }
        [(problem_id, msg, _hint)] = reported(settings, mailers)
        assert problem_id == "mailer.E006"
        assert "'priorty'" in msg

    def test_smtp_as_mailer_email_backend_without_its_mailer_is_e008(self, settings):
        mailers = {"default": {"BACKEND": DB}}
        assert ids(reported(settings, mailers, MAILER_EMAIL_BACKEND=SMTP)) == ["mailer.E008"]

    def test_deliver_using_overridden_by_mailer_email_backend_is_w001(self, settings):
        mailers: dict[str, dict[str, Any]] = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}},
            "smtp": {"BACKEND": SMTP, "OPTIONS": SMTP_OPTIONS},
            "outbox": {"BACKEND": LOCMEM},
        }
        assert ids(reported(settings, mailers, MAILER_EMAIL_BACKEND=LOCMEM)) == ["mailer.W001"]
        mailers["default"]["OPTIONS"]["deliver_using"] = "stmp"  # ignored, and still misspelt
        assert ids(reported(settings, mailers, MAILER_EMAIL_BACKEND=LOCMEM)) == ["mailer.E002", "mailer.W001"]

    @pytest.mark.django_db(databases="__all__")  # the model checks ask MariaDB and MySQL for their version
    def test_manage_py_check_fails_on_it(self, settings):
        """The check is registered with Django's framework when the app is ready."""
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {"default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "stmp"}}}
        with pytest.raises(SystemCheckError, match=r"(?s)mailer\.E002.*HINT"):
            call_command("check")


# The mailer that delivers ---------------------------------------------------------------------------


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")
@pytest.mark.parametrize(
    "delivering",
    [
        {"BACKEND": "django.core.mail.backends.smpt.EmailBackend"},  # misspelt module
        {"BACKEND": "django.core.mail.backends.smtp.EmailBackend", "OPTIONS": {"hots": "smtp.example.com"}},
    ],
    ids=["misspelt-backend", "unknown-option"],
)
@pytest.mark.parametrize("queue", ["default", "urgent"])
def test_a_delivering_mailer_that_cannot_be_made_is_reported(settings, delivering, queue):
    if hasattr(settings, "MAILER_EMAIL_BACKEND"):
        del settings.MAILER_EMAIL_BACKEND
    settings.MAILERS = {
        "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
        "urgent": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
        "smtp": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
        "broken": delivering,
    }
    settings.MAILERS[queue]["OPTIONS"]["deliver_using"] = "broken"

    [problem] = [p for p in check_mail_delivery() if p.id == "mailer.E010"]

    assert "MAILERS['broken']" in problem.msg
    assert problem.hint
