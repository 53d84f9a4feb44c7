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


# Django 6.1 warns about reading EMAIL_BACKEND, which this configuration has to do.
@pytest.mark.filterwarnings("ignore:The EMAIL_BACKEND setting is deprecated")
def test_both_settings_on_db_backend_is_refused_with_both_names(legacy_settings):
    settings = legacy_settings
    settings.EMAIL_BACKEND = DB
    settings.MAILER_EMAIL_BACKEND = DB
    with pytest.raises(
        ConfigurationError, match=r'EMAIL_BACKEND and MAILER_EMAIL_BACKEND .*"mailer.backend.DbBackend"'
    ):
        engine.send_all()


def test_delivering_through_the_queue_itself_is_refused(settings):
    settings.MAILER_EMAIL_BACKEND = DB
    with pytest.raises(ConfigurationError, match="queues it again"):
        check_delivery_route()


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
        from django.core.mail import mailers

        settings.MAILERS = {"default": {"BACKEND": DB, "OPTIONS": {"priority": 9}}}
        with pytest.raises(ValueError, match="Invalid priority 9"):
            mailers["default"]
