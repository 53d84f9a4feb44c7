"""The one place where mailer reads its settings.

Every value is read from ``django.conf.settings`` when it is asked for, never
at import time, so ``override_settings`` and settings changed by a running
process always take effect.
"""

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    "MAILER_EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
    "MAILER_LOCK_PATH": None,
    "MAILER_USE_FILE_LOCK": True,
    "MAILER_LOCK_WAIT_TIMEOUT": -1,
    "MAILER_EMPTY_QUEUE_SLEEP": 30,
    "MAILER_EMAIL_MAX_BATCH": None,
    "MAILER_EMAIL_MAX_DEFERRED": None,
    "MAILER_EMAIL_THROTTLE": 0,
    "MAILER_ERROR_HANDLER": "mailer.engine.handle_delivery_exception",
    "MAILER_MESSAGES_BATCH_SIZE": None,
    "MAILER_EMAIL_MAX_RETRIES": None,
    "MAILER_EMAIL_LOG_MESSAGE_DATA": True,
    "MAILER_PAUSE_SEND": False,
    "MAILER_CLAIM_TIMEOUT": 600,
    "MAILER_DELIVERY_CONNECTIONS": 1,
    "MAILER_RETRY_BACKOFF": None,
    "MAILER_RETRY_BACKOFF_MAX": 3600,
    "MAILER_RETRY_MAX_ATTEMPTS": 10,
    "MAILER_LEGACY_PICKLE_CLASSES": [],
    "MAILER_EMAIL_CLASSES": [],
    "MAILER_TASK_BACKEND": None,
    "MAILER_TASK_QUEUE": "default",
}


def get_setting(name: str) -> Any:
    """Return the current value of the mailer setting ``name``."""
    return getattr(settings, name, DEFAULTS[name])


def is_set(name: str) -> bool:
    """Return whether the site sets ``name`` itself (rather than relying on its default)."""
    return hasattr(settings, name)
