"""Settings for the test suite.

The database comes from the environment, so one suite runs on every vendor:

- ``MAILER_TEST_DB``: ``sqlite`` (the default), ``postgresql`` or ``mysql``;
- ``MAILER_TEST_DB_HOST``, ``MAILER_TEST_DB_PORT``, ``MAILER_TEST_DB_USER``,
  ``MAILER_TEST_DB_PASSWORD``, ``MAILER_TEST_DB_NAME``: where that server is;
  ``MAILER_TEST_DB_TEST_NAME``: the test database to create there (Django's
  ``test_`` + name by default), for two runs on one server at once;
- ``MAILER_TEST_PG_PREPARED=1``: PostgreSQL with psycopg 3's
  server-side binding and prepared statements (``OPTIONS``).

``MAILER_TEST_REQUIRE_DB=1`` (set by CI) turns "server not reachable" from
a skip into a failure; see ``tests/conftest.py``.
"""

import os
import warnings
from typing import Any

import django

SECRET_KEY = "not-a-secret"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.messages",
    "django.contrib.sessions",
    "mailer",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "tests.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DB_VENDOR = os.environ.get("MAILER_TEST_DB", "sqlite")
_ENGINES = {
    "sqlite": "django.db.backends.sqlite3",
    "postgresql": "django.db.backends.postgresql",
    "mysql": "django.db.backends.mysql",
}
_PORTS = {"postgresql": "5432", "mysql": "3306"}

if DB_VENDOR not in _ENGINES:
    raise RuntimeError(f"MAILER_TEST_DB must be one of {sorted(_ENGINES)}, not {DB_VENDOR!r}")

DATABASES: dict[str, dict[str, Any]]
if DB_VENDOR == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": _ENGINES["sqlite"],
            "NAME": os.environ.get("MAILER_TEST_DB_NAME", "mailer_tests.sqlite3"),
            "TEST": {"NAME": os.environ.get("MAILER_TEST_DB_NAME") or None},
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": _ENGINES[DB_VENDOR],
            "HOST": os.environ.get("MAILER_TEST_DB_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MAILER_TEST_DB_PORT", _PORTS[DB_VENDOR]),
            "USER": os.environ.get("MAILER_TEST_DB_USER", "mailer"),
            "PASSWORD": os.environ.get("MAILER_TEST_DB_PASSWORD", "mailer"),
            "NAME": os.environ.get("MAILER_TEST_DB_NAME", "mailer"),
            "CONN_MAX_AGE": 0,
            # Two runs on one server at once each need their own test database.
            "TEST": {"NAME": os.environ.get("MAILER_TEST_DB_TEST_NAME") or None},
        }
    }
    if DB_VENDOR == "postgresql" and os.environ.get("MAILER_TEST_PG_PREPARED") == "1":
        # psycopg 3's server-side binding, with prepared statements: a query prepared when it runs a second
        # time (a site's threshold would be higher), so that the suite runs mailer's prepared. Not the first
        # time: some apps' migrations (django-tasks-db's) run several commands in one statement, which
        # PostgreSQL cannot prepare.
        DATABASES["default"]["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 1}
    if DB_VENDOR == "mysql":
        DATABASES["default"]["OPTIONS"] = {"charset": "utf8mb4"}
        DATABASES["default"]["TEST"].update(CHARSET="utf8mb4", COLLATION="utf8mb4_unicode_ci")

# A read replica, as a site with a database router has one: in tests, the same
# database under another alias (tests/test_queue_cost.py routes reads to it).
DATABASES["replica"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}

# Django 6.1 deprecates the EMAIL_* settings in favour of MAILERS. A run uses
# one of the two configurations a site can have, so that each is tested with
# warnings as errors: the classic one (EMAIL_BACKEND, MAILER_EMAIL_BACKEND)
# by default, on every Django; MAILERS with MAILER_TEST_MAILERS=1 (Django 6.1
# only). Tests that need the other one switch it with ``override_settings``.
#
# What Django 6.1 says of each EMAIL_* setting, and a warnings-filter module
# pattern for any module but mailer's (tests/conftest.py uses both).
DEPRECATED_SETTING_WARNING = r"The EMAIL_\w+ setting is deprecated"
NOT_MAILER = r"(?!mailer\b)"

USE_MAILERS = os.environ.get("MAILER_TEST_MAILERS", "0") == "1"
if USE_MAILERS and django.VERSION < (6, 1):
    raise RuntimeError(f"MAILER_TEST_MAILERS=1 needs Django 6.1 or later, not {django.get_version()}")
if USE_MAILERS:
    MAILERS = {
        "default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
    }
else:
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    if django.VERSION >= (6, 1):
        # Django warns that the site's own EMAIL_* settings are deprecated (a
        # site that keeps them has made that choice); the same warning raised
        # from mailer's code would be mailer reading them, and stays an error.
        warnings.filterwarnings("ignore", DEPRECATED_SETTING_WARNING, PendingDeprecationWarning, NOT_MAILER)

MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
MAILER_LOCK_PATH = os.path.join(os.environ.get("MAILER_TEST_TMP", "/tmp"), f"mailer-tests-{os.getpid()}")

# The admin tests log in a superuser per test; the default hasher is slow on purpose.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
