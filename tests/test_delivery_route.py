"""Which backend delivers queued mail, with and without Django 6.1's MAILERS."""

import django
import pytest
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.core.mail.backends.smtp import EmailBackend as SmtpBackend

from mailer import engine
from mailer.backend import DbBackend
from mailer.delivery import Route, check_delivery_route, delivery_route, get_delivery_connection
from mailer.exceptions import ConfigurationError, InvalidDeliveryMailer

LOCMEM = "django.core.mail.backends.locmem.EmailBackend"
SMTP = "django.core.mail.backends.smtp.EmailBackend"
DB = "mailer.backend.DbBackend"

needs_mailers = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")


@pytest.fixture
def legacy_settings(settings):
    """Configure email the pre-6.1 way, without MAILERS, on every Django."""
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    return settings


def test_mailer_email_backend_delivers_without_mailers(legacy_settings):
    settings = legacy_settings
    settings.MAILER_EMAIL_BACKEND = LOCMEM
    assert delivery_route() == Route(LOCMEM)
    assert isinstance(get_delivery_connection(), LocmemBackend)


def test_default_delivery_is_smtp(legacy_settings):
    settings = legacy_settings
    del settings.MAILER_EMAIL_BACKEND
    assert delivery_route() == Route(SMTP)


def test_both_settings_on_db_backend_is_refused_with_both_names(legacy_settings):
    """As django-mailer 2.x said it; the message names EMAIL_BACKEND without reading it (Django 6.1 deprecates it)."""
    settings = legacy_settings
    settings.MAILER_EMAIL_BACKEND = DB
    with pytest.raises(
        ConfigurationError, match=r'EMAIL_BACKEND and MAILER_EMAIL_BACKEND .*"mailer.backend.DbBackend"'
    ) as refused:
        engine.send_all()
    assert refused.value.check_id == "mailer.E005"


@needs_mailers
class TestWithMailers:
    def test_deliver_using_names_the_delivering_mailer(self, settings):
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "outbound"}},
            "outbound": {"BACKEND": LOCMEM},
        }
        assert delivery_route() == Route(LOCMEM, "outbound")
        connection = get_delivery_connection()
        assert isinstance(connection, LocmemBackend)
        assert connection.alias == "outbound"  # type: ignore[attr-defined]  # django-stubs 6.1.2 lacks alias

    def test_a_default_mailer_that_delivers_is_used(self, settings):
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {"default": {"BACKEND": LOCMEM}, "queue": {"BACKEND": DB}}
        assert delivery_route() == Route(LOCMEM, "default")

    def test_queue_as_default_without_deliver_using_is_explained(self, settings):
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {"default": {"BACKEND": DB}}
        with pytest.raises(
            InvalidDeliveryMailer, match=r"^MAILERS\['default'\]: .* set its OPTIONS\['deliver_using'\]"
        ):
            engine.send_all()

    def test_deliver_using_an_unknown_mailer_is_explained(self, settings):
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {"default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "missing"}}}
        with pytest.raises(InvalidDeliveryMailer, match="'missing' that should deliver queued mail is not in MAILERS"):
            check_delivery_route()

    def test_mailer_email_backend_picks_the_mailer_configured_with_that_class(self, settings):
        """A 2.x site that kept MAILER_EMAIL_BACKEND = SMTP gets its MAILERS' SMTP OPTIONS."""
        settings.MAILER_EMAIL_BACKEND = SMTP
        settings.MAILERS = {
            "default": {"BACKEND": DB},
            "smtp": {"BACKEND": SMTP, "OPTIONS": {"host": "mail.example.com", "port": 2525}},
        }
        connection = get_delivery_connection()
        assert isinstance(connection, SmtpBackend)
        assert (connection.host, connection.port) == ("mail.example.com", 2525)
        assert connection.alias == "smtp"  # type: ignore[attr-defined]  # django-stubs 6.1.2 lacks alias

    def test_mailer_email_backend_without_a_matching_mailer_is_made_directly(self, settings):
        settings.MAILER_EMAIL_BACKEND = LOCMEM
        settings.MAILERS = {"default": {"BACKEND": DB}}
        assert delivery_route() == Route(LOCMEM)
        assert isinstance(get_delivery_connection(), LocmemBackend)

    def test_db_backend_accepts_its_options_and_rejects_others(self, settings):
        from django.core.mail import InvalidMailer, mailers

        settings.MAILERS = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "x", "priority": 1}},
            "wrong": {"BACKEND": DB, "OPTIONS": {"colour": "blue"}},
        }
        queue = mailers["default"]
        assert isinstance(queue, DbBackend) and queue.deliver_using == "x"
        with pytest.raises(InvalidMailer, match="colour"):
            mailers["wrong"]

    def test_a_wrong_priority_option_fails_when_the_mailer_is_made(self, settings):
        from django.core.mail import InvalidMailer, mailers

        settings.MAILERS = {"default": {"BACKEND": DB, "OPTIONS": {"priority": 9}}}
        with pytest.raises(InvalidMailer, match=r"^MAILERS\['default'\]: OPTIONS\['priority'\]: .*not 9"):
            mailers["default"]

    def test_delivering_through_a_queue_named_by_mailer_email_backend_is_refused(self, settings):
        settings.MAILER_EMAIL_BACKEND = DB
        settings.MAILERS = {"default": {"BACKEND": DB}}
        with pytest.raises(ConfigurationError, match="queues it again") as refused:
            check_delivery_route()
        assert refused.value.check_id == "mailer.E005"

    def test_deliver_using_another_queue_is_refused(self, settings):
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "other"}},
            "other": {"BACKEND": DB, "OPTIONS": {"deliver_using": "default"}},
        }
        with pytest.raises(InvalidDeliveryMailer, match=r"names MAILERS\['other'\], which queues mail again"):
            engine.send_all()

    def test_smtp_named_by_mailer_email_backend_without_a_mailer_is_refused(self, settings):
        """Django's SMTP backend made without an alias would read EMAIL_HOST, which MAILERS takes away."""
        settings.MAILER_EMAIL_BACKEND = SMTP
        settings.MAILERS = {"default": {"BACKEND": DB}}
        with pytest.raises(ConfigurationError, match="no MAILERS entry uses it") as refused:
            engine.send_all()
        assert refused.value.check_id == "mailer.E008"

    def test_mail_of_a_queue_mailer_leaves_through_its_own_deliver_using(self, settings):
        """Where routing each message by the mailer it was queued through plugs in."""
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {
            "default": {"BACKEND": DB, "OPTIONS": {"deliver_using": "smtp"}},
            "bulk": {"BACKEND": DB, "OPTIONS": {"deliver_using": "outbound"}},
            "plain": {"BACKEND": DB},
            "smtp": {"BACKEND": SMTP, "OPTIONS": {"host": "mail.example.com"}},
            "outbound": {"BACKEND": LOCMEM},
        }
        assert delivery_route("bulk") == Route(LOCMEM, "outbound")
        assert delivery_route("plain") == Route(SMTP, "smtp")  # no deliver_using: as the default mailer's mail
        assert delivery_route("outbound") == Route(LOCMEM, "outbound")
        assert get_delivery_connection(alias="bulk").alias == "outbound"  # type: ignore[attr-defined]
        with pytest.raises(InvalidDeliveryMailer, match="'gone' that should deliver queued mail is not in MAILERS"):
            get_delivery_connection(alias="gone")
