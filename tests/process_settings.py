"""Settings for ``tests/manage.py``: a database and a real SMTP server, both named by the environment.

- ``MAILER_PROCESS_DATABASE``: the database, as a JSON object in the form of
  an entry of ``DATABASES`` (a SQLite file, or a database on the PostgreSQL
  or MariaDB server; see ``tests/processes.py``);
- ``MAILER_PROCESS_DB``: or only the path of a SQLite database file;
- ``MAILER_PROCESS_SMTP_PORT``: port of the SMTP server on 127.0.0.1;
- ``MAILER_PROCESS_LOCK_PATH``: the lock file (optional);
- ``MAILER_PROCESS_EMPTY_QUEUE_SLEEP``: seconds between polls of ``runmailer`` (optional);
- ``MAILER_PROCESS_USE_FILE_LOCK``: "0" to run without the lock file (optional);
- ``MAILER_PROCESS_THROTTLE``: seconds to wait after each message (optional);
- ``MAILER_PROCESS_DELIVERY_CONNECTIONS``: delivery connections of a pass (optional).

On Django 6.1 delivery is configured with MAILERS, before it with the
EMAIL_* settings, as a django-mailer 2.x site has them.
"""

import json
import os

import django

SECRET_KEY = "not-a-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "mailer"]
if "MAILER_PROCESS_DATABASE" in os.environ:
    DATABASES = {"default": json.loads(os.environ["MAILER_PROCESS_DATABASE"])}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ["MAILER_PROCESS_DB"],
            "OPTIONS": {"timeout": 20},
        }
    }

_SMTP_HOST = "127.0.0.1"
_SMTP_PORT = int(os.environ.get("MAILER_PROCESS_SMTP_PORT", "25"))

if django.VERSION >= (6, 1):
    MAILERS = {
        "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
        "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": _SMTP_HOST, "port": _SMTP_PORT, "timeout": 10},
        },
    }
else:
    EMAIL_BACKEND = "mailer.backend.DbBackend"
    MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = _SMTP_HOST
    EMAIL_PORT = _SMTP_PORT
    EMAIL_TIMEOUT = 10

if "MAILER_PROCESS_EMPTY_QUEUE_SLEEP" in os.environ:
    MAILER_EMPTY_QUEUE_SLEEP = float(os.environ["MAILER_PROCESS_EMPTY_QUEUE_SLEEP"])

if "MAILER_PROCESS_THROTTLE" in os.environ:
    MAILER_EMAIL_THROTTLE = float(os.environ["MAILER_PROCESS_THROTTLE"])

if "MAILER_PROCESS_DELIVERY_CONNECTIONS" in os.environ:
    MAILER_DELIVERY_CONNECTIONS = int(os.environ["MAILER_PROCESS_DELIVERY_CONNECTIONS"])

if os.environ.get("MAILER_PROCESS_USE_FILE_LOCK") == "0":
    MAILER_USE_FILE_LOCK = False

if "MAILER_PROCESS_LOCK_PATH" in os.environ:
    MAILER_LOCK_PATH = os.environ["MAILER_PROCESS_LOCK_PATH"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"mailer": {"handlers": ["stderr"], "level": "INFO"}},
}
