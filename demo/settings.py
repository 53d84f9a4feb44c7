"""Settings of the demo site: what a real project adds to use mailer.

``demo.py`` sets two environment variables before Django starts, here and in
the ``manage.py send_mail`` process: ``MAILER_DEMO_DIR`` (a temporary
directory for the SQLite database and the lock file) and
``MAILER_DEMO_SMTP_PORT`` (where the demo's SMTP server listens).
"""

import os
from pathlib import Path

import django

WORK_DIR = Path(os.environ["MAILER_DEMO_DIR"])
SMTP_HOST = "127.0.0.1"
SMTP_PORT = int(os.environ["MAILER_DEMO_SMTP_PORT"])

SECRET_KEY = "demo-only-not-a-secret"
USE_TZ = True
INSTALLED_APPS = ["mailer"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": WORK_DIR / "demo.sqlite3"}}
DEFAULT_FROM_EMAIL = "Demo Site <noreply@demo.example>"

# Sending takes the lock file so that two cron runs never overlap; keep it
# out of the checkout.
MAILER_LOCK_PATH = str(WORK_DIR / "send_mail")

if django.VERSION >= (6, 1):
    # Django 6.1 configures email with MAILERS; the EMAIL_* settings are
    # deprecated there. The default mailer queues; deliver_using names the
    # mailer that `manage.py send_mail` delivers through.
    MAILERS = {
        "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"deliver_using": "smtp"}},
        "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": SMTP_HOST, "port": SMTP_PORT},
        },
    }
else:
    # Django 5.2 and 6.0, the django-mailer 2.x way: everything sent through
    # Django's mail API is queued; MAILER_EMAIL_BACKEND delivers it.
    EMAIL_BACKEND = "mailer.backend.DbBackend"
    MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = SMTP_HOST
    EMAIL_PORT = SMTP_PORT

# Show what mailer logs (each message sent, the summary of the pass), as a
# cron job's mail or log file would.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "    [%(name)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"mailer": {"handlers": ["console"], "level": "INFO"}},
}
