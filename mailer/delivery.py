"""Which email backend really delivers the queued mail.

Everything that needs a delivering connection asks ``get_delivery_connection``,
so this module is the only place that knows about ``MAILER_EMAIL_BACKEND``,
Django 6.1's ``MAILERS`` and how they combine:

- Without ``MAILERS`` (Django 5.2 and 6.0, or 6.1 with the old settings), the
  backend class named by ``MAILER_EMAIL_BACKEND`` delivers, as in
  django-mailer 2.x.
- With ``MAILERS``, and ``MAILER_EMAIL_BACKEND`` set, the mailer configured
  with that class delivers (so its ``OPTIONS`` apply); if no mailer uses that
  class, the class is created as it is.
- With ``MAILERS`` and no ``MAILER_EMAIL_BACKEND``, the default mailer
  delivers, unless it is the queue itself (``DbBackend``): then its
  ``deliver_using`` option names the mailer that delivers.
"""

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.utils.module_loading import import_string

from mailer import conf
from mailer.backend import DbBackend
from mailer.exceptions import ConfigurationError, InvalidDeliveryMailer
from mailer.smtp import EmailBackend as KeepingRefusalsBackend

DB_BACKEND = "mailer.backend.DbBackend"
DJANGO_DEFAULT_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
DEFAULT_MAILER = "default"


@dataclass(frozen=True)
class Route:
    """How queued mail leaves: through a ``MAILERS`` alias, or a backend class made directly."""

    backend_path: str
    alias: str | None = None

    def describe(self) -> str:
        if self.alias is None:
            return self.backend_path
        return f"MAILERS[{self.alias!r}] ({self.backend_path})"


def mailers_configured() -> bool:
    """Return whether the site uses Django 6.1's ``MAILERS`` setting."""
    return hasattr(settings, "MAILERS")


def _mailer_config(alias: str) -> dict[str, Any]:
    try:
        config: dict[str, Any] = settings.MAILERS[alias]
    except KeyError as exc:
        raise InvalidDeliveryMailer(f"The mailer {alias!r} that should deliver queued mail is not in MAILERS.") from exc
    return config


def _backend_path(config: dict[str, Any]) -> str:
    return str(config.get("BACKEND", DJANGO_DEFAULT_BACKEND))


def delivery_route() -> Route:
    """Decide how queued mail is delivered, from the settings as they are now."""
    if not mailers_configured():
        return Route(conf.get_setting("MAILER_EMAIL_BACKEND"))

    if conf.is_set("MAILER_EMAIL_BACKEND"):
        path = conf.get_setting("MAILER_EMAIL_BACKEND")
        for alias, config in settings.MAILERS.items():
            if _backend_path(config) == path:
                return Route(path, alias)
        return Route(path)

    default = _mailer_config(DEFAULT_MAILER)
    if not _is_queue(_backend_path(default)):
        return Route(_backend_path(default), DEFAULT_MAILER)
    alias = default.get("OPTIONS", {}).get("deliver_using")
    if not alias:
        raise InvalidDeliveryMailer(
            f"{DB_BACKEND} queues mail rather than delivering it: "
            "set its OPTIONS['deliver_using'] to the alias of the mailer that delivers queued mail.",
            alias=DEFAULT_MAILER,
        )
    return Route(_backend_path(_mailer_config(alias)), alias)


def _is_queue(backend_path: str) -> bool:
    if backend_path == DB_BACKEND:
        return True
    try:
        backend_class = import_string(backend_path)
    except ImportError:
        return False
    return isinstance(backend_class, type) and issubclass(backend_class, DbBackend)


def check_delivery_route() -> Route:
    """Return the route, or raise ConfigurationError if it would put mail back on the queue."""
    route = delivery_route()
    if _is_queue(route.backend_path):
        if not mailers_configured() and getattr(settings, "EMAIL_BACKEND", None) == route.backend_path:
            raise ConfigurationError(
                f'EMAIL_BACKEND and MAILER_EMAIL_BACKEND should not both be set to "{route.backend_path}" '
                "at the same time: MAILER_EMAIL_BACKEND must name the backend that really delivers mail."
            )
        raise ConfigurationError(
            f"Queued mail would be delivered by {route.describe()}, which queues it again. "
            "MAILER_EMAIL_BACKEND (or the deliver_using option) must name a backend that really delivers mail."
        )
    return route


def get_delivery_connection(message: object = None) -> BaseEmailBackend:
    """Return a new, unopened connection of the backend that delivers ``message``.

    Every queued message leaves the same way today; ``message`` is where
    routing a message to the mailer it was queued for will hook in.

    Where Django's SMTP backend delivers, its subclass in ``mailer.smtp``
    does, with the same options, so that refused recipients are logged.
    """
    route = check_delivery_route()
    backend_class = import_string(route.backend_path)
    if backend_class is DjangoSMTPBackend:
        backend_class = KeepingRefusalsBackend
    if route.alias is None:
        connection: BaseEmailBackend = backend_class()
        return connection
    if backend_class is KeepingRefusalsBackend:
        return KeepingRefusalsBackend(alias=route.alias, **_mailer_config(route.alias).get("OPTIONS", {}))

    from django.core.mail import mailers  # Django 6.1 and later; the route has an alias only there

    connection = mailers[route.alias]
    return connection
