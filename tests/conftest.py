import os

import django
import pytest

from tests.smtp import SMTPServer

MAILERS_SUPPORTED = django.VERSION >= (6, 1)
SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"


def pytest_collection_modifyitems(config, items):
    """Skip everything when the chosen database server is not there, unless CI requires it."""
    vendor = os.environ.get("MAILER_TEST_DB", "sqlite")
    if vendor == "sqlite":
        return
    problem = _database_problem()
    if problem is None:
        return
    if os.environ.get("MAILER_TEST_REQUIRE_DB") == "1":
        raise pytest.UsageError(f"MAILER_TEST_REQUIRE_DB=1 but the {vendor} server is not usable: {problem}")
    skip = pytest.mark.skip(reason=f"{vendor} server not reachable: {problem}")
    for item in items:
        item.add_marker(skip)


def _database_problem() -> str | None:
    from django.db import connection

    # A raw connection: pytest-django blocks the usual ones outside tests.
    try:
        raw = connection.get_new_connection(connection.get_connection_params())
    except Exception as exc:
        return str(exc).strip() or type(exc).__name__
    raw.close()
    return None


@pytest.fixture
def smtp_server():
    server = SMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def deliver_to_smtp(settings, smtp_server):
    """Configure delivery through Django's SMTP backend to ``smtp_server``; return the server.

    On Django 6.1 this is done the modern way, with MAILERS; before it, with
    MAILER_EMAIL_BACKEND and the EMAIL_* settings, as django-mailer 2.x sites do.
    """
    configure_smtp_delivery(settings, smtp_server)
    return smtp_server


def configure_smtp_delivery(settings, server) -> None:
    if MAILERS_SUPPORTED:
        del settings.MAILER_EMAIL_BACKEND
        settings.MAILERS = {
            "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
            "smtp": {"BACKEND": SMTP_BACKEND, "OPTIONS": {"host": server.host, "port": server.port, "timeout": 10}},
        }
    else:
        settings.MAILER_EMAIL_BACKEND = SMTP_BACKEND
        settings.EMAIL_HOST = server.host
        settings.EMAIL_PORT = server.port
        settings.EMAIL_TIMEOUT = 10


@pytest.fixture(autouse=True)
def lock_path(settings, tmp_path):
    """Give each test its own lock file, so tests never contend for one."""
    settings.MAILER_LOCK_PATH = str(tmp_path / "send_mail")
    return settings.MAILER_LOCK_PATH
