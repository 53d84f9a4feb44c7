import os
from pathlib import Path

import django
import pytest
from hypothesis import settings as hypothesis_settings

import mailer
from tests.settings import DEPRECATED_SETTING_WARNING, NOT_MAILER, USE_MAILERS
from tests.smtp import SMTPServer

# Whether this run configures email with Django 6.1's MAILERS (MAILER_TEST_MAILERS=1)
# rather than the classic EMAIL_BACKEND and MAILER_EMAIL_BACKEND.
MAILERS_SUPPORTED = USE_MAILERS
SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"

# How hard the property tests try: HYPOTHESIS_PROFILE=ci (`./run-tests all`,
# CI) or dev (the default, for quick runs).
hypothesis_settings.register_profile("ci", max_examples=200, print_blob=True)
hypothesis_settings.register_profile("dev", max_examples=20)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

CHECKOUT_PACKAGE = Path(__file__).resolve().parent.parent / "mailer"


def pytest_configure(config):
    """Under tox (MAILER_TEST_INSTALLED=1) the tests must run against the installed wheel, not the checkout.

    On Django 6.1, a test that sets an EMAIL_* setting is the site
    configuring itself the classic way: Django's warning about that setting
    is not an error, unless it comes from mailer's code.
    """
    if django.VERSION >= (6, 1):
        config.addinivalue_line(
            "filterwarnings",
            f"ignore:{DEPRECATED_SETTING_WARNING}:django.utils.deprecation.RemovedInDjango2028Warning:{NOT_MAILER}",
        )
    if os.environ.get("MAILER_TEST_INSTALLED") == "1" and Path(mailer.__file__).resolve().parent == CHECKOUT_PACKAGE:
        raise pytest.UsageError(
            f"MAILER_TEST_INSTALLED=1 but mailer was imported from the checkout ({mailer.__file__}), "
            "not from the installed package: something put the checkout ahead of site-packages on sys.path"
        )


def pytest_report_header(config):
    return f"mailer {mailer.__version__}: {Path(mailer.__file__).parent}"


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


def deliver_through(settings, backend_path: str) -> None:
    """Make ``backend_path`` the delivering backend, in whichever configuration ``deliver_to_smtp`` made."""
    mailers = getattr(settings, "MAILERS", None)
    if mailers and "smtp" in mailers:
        settings.MAILERS = {**mailers, "smtp": {**mailers["smtp"], "BACKEND": backend_path}}
    else:
        settings.MAILER_EMAIL_BACKEND = backend_path


@pytest.fixture(autouse=True)
def lock_path(settings, tmp_path):
    """Give each test its own lock file, so tests never contend for one."""
    settings.MAILER_LOCK_PATH = str(tmp_path / "send_mail")
    return settings.MAILER_LOCK_PATH


@pytest.fixture(autouse=True)
def nothing_left_unfinished():
    """Each test begins as a new process: with nothing an earlier pass could not write (``mailer.unfinished``)."""
    yield
    from mailer import unfinished

    unfinished._sent_unmarked.clear()
    unfinished._claims_kept.clear()


@pytest.fixture
def hold_lock(lock_path):
    """Return a function that has another owner take a lock file (this test's by default) and hold it.

    ``hold_lock(hold_for=0.5)`` lets it go after half a second; every holder
    lets go at the end of the test.
    """
    from tests.locks import LockHolder

    holders = []

    def hold(path=lock_path, hold_for=None):
        holder = LockHolder(path).start(hold_for=hold_for)
        holders.append(holder)
        return holder

    yield hold
    for holder in holders:
        holder.release()


@pytest.fixture
def process_db(tmp_path):
    """A migrated database of its own, on this run's vendor, shared with the ``manage.py`` processes a test starts."""
    from tests.processes import fresh_database, manage

    with fresh_database(tmp_path) as db:
        result = manage("migrate", "-v", "0", db=db)
        assert result.returncode == 0, result.stderr
        yield db
